"""What machine a measurement belongs to.

Step costs, linear-product timings and bench results hold for one kind of machine: two CPUs with the same core count
rank the same decoding settings differently (a 2-core Xeon with AMX prices a copy chain at 1.5x a plain step, a
2-core AMD EPYC at 1.0x), and a GPU verifies 16 tokens for the price of one. These names say which machine a number
was measured on, so that whoever reads it back can tell whether it applies where they run.
"""

import functools
import platform
import re
from pathlib import Path

import torch


@functools.cache
def cpu_description() -> str:
    """The CPU's model name and the bf16 instructions it has (`amx_bf16`, `avx512_bf16`): on CPUs alike but for
    those, the same bench runs at other speeds, and bf16 products run several times faster or slower than fp32."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    bf16 = sorted({flag for flag in cpuinfo.split() if flag in ("amx_bf16", "avx512_bf16")})
    name = names[0] if names else platform.machine()
    return f"{name}, {'+'.join(bf16) if bf16 else 'no bf16 instructions'}"


@functools.cache
def _accelerator_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type  # no finer name known: every device of the type is one machine


def machine_of(device: torch.device | str) -> str:
    """The device type, then the machine's name: `"cpu: AMD EPYC, avx512_bf16"`, `"cuda: NVIDIA H100 80GB HBM3"`.
    A policy keeps step costs per machine under these names (`BlockPolicy.set_step_costs(..., machine=...)`)."""
    device = torch.device(device)
    if device.type == "cpu":
        return f"cpu: {cpu_description()}"
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return f"{device.type}: {_accelerator_name(device)}"


def device_type_of(machine: str) -> str:
    """The device type a `machine_of` name starts with."""
    return machine.split(":", 1)[0]


def machine_file_name(machine: str) -> str:
    """A file name for what was measured on `machine`: `"cpu: AMD EPYC, avx512_bf16"` -> `amd_epyc_avx512_bf16.json`
    (`blockpilot bench --step-costs DIR` writes this machine's table there)."""
    words = re.findall(r"[a-z0-9]+", machine.split(":", 1)[1].lower())
    return "_".join(words) + ".json"
