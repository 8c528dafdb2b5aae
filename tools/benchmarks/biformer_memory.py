"""Peak CPU memory of BiFormer inference: lean BRA (model default) vs the official all-at-once K/V gather.

`python tools/bench.py biformer_memory --json F [--size 448 --batch 8 --threads 2]`

Each path runs in a fresh subprocess (fp32, torch.no_grad, same seed so the same weights and input). The
figure per path is the peak resident set of the forward minus the resident set right after building the
model and the input: peak = `resource.getrusage(RUSAGE_SELF).ru_maxrss`, baseline = VmRSS of
/proc/self/status (Linux). The children run with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB so large
freed blocks go back to the OS (glibc's dynamic threshold otherwise keeps them in the heap and RSS measures
fragmentation rather than live tensors); same setting for both paths. `ratio` = lean / gather;
`max_abs_diff` compares the two paths' logits.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MMAP_THRESHOLD = 128 * 1024


def add_arguments(parser):
    parser.add_argument('--model', default='biformer_tiny')
    parser.add_argument('--size', type=int, default=448, help='square input side (px)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads per run')


def _rss_mib() -> float:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    raise RuntimeError('VmRSS not found in /proc/self/status (Linux only)')


def _worker(model_name: str, impl: str, size: int, batch: int, threads: int, out_path: str) -> dict:
    """One measurement in this (fresh) process; writes the logits to out_path."""
    import timm
    import torch

    import mmfm.backbones  # noqa: F401  (registers biformer_*)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(model_name, bra_impl=impl).eval()
    x = torch.randn(batch, 3, size, size)
    baseline = _rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(x)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    torch.save(logits, out_path)
    return {'baseline_mib': round(baseline, 1), 'peak_mib': round(peak, 1), 'mib': round(peak - baseline, 1),
                'seconds': round(seconds, 2)}


def _measure(args, impl: str, out_path: Path) -> dict:
    cmd = [sys.executable, __file__, args.model, impl, str(args.size), str(args.batch), str(args.threads),
           str(out_path)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f'biformer_memory: {impl} run failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        runs = {impl: _measure(args, impl, Path(tmp) / f'{impl}.pt') for impl in ('lean', 'gather')}
        lean, gather = (torch.load(Path(tmp) / f'{impl}.pt', weights_only=True) for impl in ('lean', 'gather'))
    return {
        'model': args.model, 'size': args.size, 'batch': args.batch, 'threads': args.threads, 'dtype': 'float32',
        'lean_mib': runs['lean']['mib'], 'gather_mib': runs['gather']['mib'],
        'ratio': round(runs['lean']['mib'] / runs['gather']['mib'], 3),
        'max_abs_diff': (lean - gather).abs().max().item(),
        'lean_s': runs['lean']['seconds'], 'gather_s': runs['gather']['seconds'],
        'baseline_mib': runs['lean']['baseline_mib'], 'malloc_mmap_threshold': MMAP_THRESHOLD,
    }


if __name__ == '__main__':
    name, impl, size, batch, threads, out = sys.argv[1:]
    print(json.dumps(_worker(name, impl, int(size), int(batch), int(threads), out)))
