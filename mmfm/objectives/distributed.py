"""Cross-rank gathers for contrastive learning (open_clip's gather-with-grad semantics).

Every rank computes the loss over the GLOBAL batch. ``torch.distributed.nn.all_gather`` sums the
gradients of every rank's copy back onto the local chunk; DDP then averages over ranks, so W processes x
batch B reproduce the loss and gradients of 1 process x batch W*B.
"""

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
