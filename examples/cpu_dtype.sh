# Sourced by the long CPU jobs (examples/regenerate_at_scale.sh, examples/drafter_study.sh): DTYPE, unless set, is
# bf16 where the CPU has bf16 dot products (AMX or AVX512-BF16) and fp32 elsewhere. On the 2-core AMD EPYC with
# AVX512-BF16, bf16 products run 4.5x its fp32 ones (0.85 against 0.19 TFLOPS; results/current/cpu_bf16/) and the
# generator made 391 response tokens/s in bf16; on the 2-core Xeon without them bf16 ran ~5x slower than fp32. Both
# jobs must agree: a feature store is tied to the target as loaded, in its dtype.
if [ -z "${DTYPE:-}" ]; then
  DTYPE=fp32
  if grep -qwE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null; then DTYPE=bf16; fi
fi
