"""Temporal token rolling (All-in-One): parameter-free mixing of neighbouring frames.

Video tokens are laid out ``[CLS, frame0 patches, frame1 patches, ...]`` with N patches per frame.
With fold = N // 8, patches [0, fold) of frame t take their value from frame t-1 (a +1 shift in time),
patches [N - fold, N) from frame t+1 (a -1 shift), cyclically as torch.roll does; CLS and the other
patches stay. Rolling is expressed as a gather index so that one ``index_select`` applies it to a padded
batch, a packed batch, or the vision part of a joint [text ; vision] sequence alike.
"""

import torch


def roll_index(num_frames: int, patches_per_frame: int, num_prefix: int = 1) -> torch.Tensor:
    """Gather index (num_prefix + T*N,) such that ``x[index]`` is x rolled. Identity for one frame."""
    t, n = num_frames, patches_per_frame
    fold = n // 8
    frame = torch.arange(t)[:, None].expand(t, n)
    patch = torch.arange(n)[None, :].expand(t, n)
    source_frame = frame.clone()
    source_frame[:, :fold] = (frame[:, :fold] - 1) % t
    if fold:
        source_frame[:, n - fold:] = (frame[:, n - fold:] + 1) % t
    body = num_prefix + source_frame * n + patch
    return torch.cat([torch.arange(num_prefix), body.reshape(-1)])


def offset_index(index: torch.Tensor, offset: int, prefix_len: int) -> torch.Tensor:
    """Index for a sequence that has ``prefix_len`` unrolled tokens in front of the rolled part."""
    return torch.cat([torch.arange(prefix_len, device=index.device), index + offset])
