# Sourced by the long CPU jobs (examples/regenerate_at_scale.sh, examples/drafter_study.sh): preload jemalloc,
# keeping the memory it frees (no decay), where it is installed. On VMs like this project's, a page a process gives
# back to the OS costs a fault when it is taken again, and glibc gives a training step's large buffers back every
# step: 14 of a step's 36 CPU-seconds went to the kernel. With jemalloc 10.6 s a step instead of 17.8, bulk decoding
# 162 tokens/s instead of 142 (results/current/allocator/, docs/performance.md); a process then holds its peak
# memory until it ends. JEMALLOC=0 leaves the allocator alone; `apt-get install libjemalloc2` installs the library.
if [ "${JEMALLOC:-1}" != 0 ] && [ -z "${LD_PRELOAD:-}" ]; then
  for place in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64; do
    lib=$place/libjemalloc.so.2
    if [ -f "$lib" ]; then
      export LD_PRELOAD=$lib MALLOC_CONF=${MALLOC_CONF:-dirty_decay_ms:-1,muzzy_decay_ms:-1}
      break
    fi
  done
fi
