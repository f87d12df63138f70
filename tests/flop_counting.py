"""torch's FlopCounterMode with the CPU attention kernels mapped to torch's own SDPA formulas, so
the analytic counts (idcrafter/video/flops.py, mcimage/flops.py) can be checked on a CPU."""

from __future__ import annotations

import torch
import torch.utils.flop_counter as flop_counter


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def counted(fn) -> int:
    """FLOPs torch's FlopCounterMode counts (matmuls, convolutions, attention; the CPU attention
    kernels mapped to torch's own SDPA formulas)."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()
