"""`mmfm index build`, `mmfm search`, `mmfm vqa`, `mmfm classify`, `mmfm serve`: the inference API from the shell.

    mmfm index build --model M --images 'photos/*.jpg' --out idx/     # or --images DIR, --videos ...
    mmfm search --index idx/ --model M --text "a red circle" --k 10 --rerank 16 [--json]
    mmfm vqa --model M --image photo.png --question "what colour is the circle?"
    mmfm classify --model M --image photo.png --labels "circle,square,star" [--json]
    mmfm serve --model M --index idx/ --host 127.0.0.1 --port 8000 [--max-decode-pixels N]
    mmfm reconstruct --model T --root data/shapes --annotations annotations/video_test.json --out recon/

M is a zoo name, a run directory or a .safetensors file. torch is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from mmfm.errors import InputError


def register(subparsers) -> None:
    """Add the `index`, `search`, `vqa` and `serve` commands; each sets `args.func(args) -> exit code`."""
    index = subparsers.add_parser("index", help="build a retrieval index of images or videos")
    build = index.add_subparsers(dest="index_command", required=True).add_parser(
        "build", help="encode a gallery once (features + cached tokens) and save it")
    _model_argument(build)
    media = build.add_mutually_exclusive_group(required=True)
    media.add_argument("--images", help="a directory or a glob of image files")
    media.add_argument("--videos", help="a directory or a glob of video files")
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--chunk-size", type=int, default=1024,
                       help="items encoded between saves to OUT/build.partial; a re-run of an interrupted "
                            "build with the same arguments continues after the last saved chunk")
    build.add_argument("--approximate-from", type=int, default=None, metavar="N",
                       help="search approximately (faiss) from N items on, exactly below (default 100000)")
    build.add_argument("--ann", default=None, metavar="KIND",
                       help="approximate structure: pq (default: PQ fast-scan + exact re-scoring), ivf, hnsw")
    build.set_defaults(func=cmd_index_build)

    search = subparsers.add_parser("search", help="search an index with a text (or an image / video)")
    search.add_argument("--index", required=True, help="index directory written by `mmfm index build`")
    _model_argument(search)
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text")
    query.add_argument("--image")
    query.add_argument("--video")
    search.add_argument("--k", type=int, default=10, help="number of hits")
    search.add_argument("--rerank", type=int, default=None, help="ITM re-rank the top RERANK ITC candidates")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.set_defaults(func=cmd_search)

    vqa = subparsers.add_parser("vqa", help="answer a question about an image or a video")
    _model_argument(vqa)
    media = vqa.add_mutually_exclusive_group(required=True)
    media.add_argument("--image")
    media.add_argument("--video")
    vqa.add_argument("--question", required=True)
    vqa.add_argument("--topk", type=int, default=5)
    vqa.add_argument("--json", action="store_true", help="print the answers as JSON")
    vqa.set_defaults(func=cmd_vqa)

    classify = subparsers.add_parser("classify", help="zero-shot classify images (or videos) against class labels")
    _model_argument(classify)
    classify.add_argument("--image", action="append", required=True,
                          help="an image (or video) file; repeat for several")
    classify.add_argument("--labels", required=True, help="class names: comma-separated (cat,dog) or a JSON list")
    classify.add_argument("--templates", nargs="+", default=None,
                          help="prompt templates, {} where the label goes (default: 'a photo of a {}.' and 3 more)")
    classify.add_argument("--topk", type=int, default=5)
    classify.add_argument("--json", action="store_true", help="print the labels as JSON")
    classify.set_defaults(func=cmd_classify)

    serve = subparsers.add_parser("serve", help="HTTP server and web page: GET /, POST /search, POST /vqa, "
                                                "POST /classify, GET /health")
    _model_argument(serve)
    serve.add_argument("--index", help="index directory for /search")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-upload-mb", type=float, default=20)
    serve.add_argument("--batch-wait-ms", type=float, default=5)
    serve.add_argument("--max-decode-pixels", type=int, default=None,
                       help="pixels that concurrent uploads may decode at once; uploads past it wait "
                            "(default: one video at the clip limit, 300000000)")
    serve.set_defaults(func=cmd_serve)

    recon = subparsers.add_parser("reconstruct", help="videos of annotation files through a video tokenizer "
                                                      "and back, to evaluate models on its reconstructions")
    _model_argument(recon)
    recon.add_argument("--root", required=True, help="the data root the annotations' video paths are relative to")
    recon.add_argument("--annotations", nargs="+", required=True,
                       help="ALBEF video annotation files, relative to --root; copied to --out")
    recon.add_argument("--out", required=True, help="written like --root: evaluate with data.root=OUT")
    recon.add_argument("--batch-size", type=int, default=8)
    recon.set_defaults(func=cmd_reconstruct)


def _model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="zoo name, run directory or .safetensors file")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the best available)")


def _pipeline(args):
    from mmfm.inference.pipeline import load

    return load(args.model, device=args.device)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from mmfm.factory import create_model
    from mmfm.inference.reconstruct import reconstruct_annotations
    from mmfm.tokenizers.cvivit import CViViT

    model = create_model(args.model, pretrained=True)
    if not isinstance(model, CViViT):
        raise InputError(f"--model {args.model}: a {model.arch_dict().get('family')!r} model, not a video "
                         "tokenizer; pass a C-ViViT (`mmfm zoo list`: family tokenizer, or a tokenizer run)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = reconstruct_annotations(model.to(device).eval(), args.root, args.annotations, args.out,
                                      args.batch_size, quiet=args.quiet)
    print(json.dumps(summary))
    return 0


def expand_files(pattern: str, kind: str) -> list[str]:
    """Files of a directory (sorted, by known extension) or of a glob; InputError when none match."""
    from mmfm.inference.pipeline import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    extensions = VIDEO_EXTENSIONS if kind == "video" else IMAGE_EXTENSIONS
    path = Path(pattern)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    else:
        files = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise InputError(f"--{kind}s {pattern!r}: no {kind} files found; pass a directory or a quoted glob")
    return files


def cmd_index_build(args: argparse.Namespace) -> int:
    import shutil
    import sys

    from mmfm.inference.index import ApproxSearch

    kind = "image" if args.images else "video"
    files = expand_files(args.images or args.videos, kind)
    settings = {name: value for name, value in (("min_items", args.approximate_from), ("kind", args.ann))
                if value is not None}
    approx = ApproxSearch(**settings)
    pipe = _pipeline(args)
    partial = Path(args.out) / "build.partial"
    index = pipe.index(**{f"{kind}s": files}, batch_size=args.batch_size, approx=approx, partial=partial,
                       chunk_size=args.chunk_size, progress=not args.quiet and sys.stderr.isatty())
    index.save(args.out)
    shutil.rmtree(partial)
    print(f"indexed {len(index)} {kind}s -> {args.out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from mmfm.inference.index import Index

    pipe = _pipeline(args)
    index = Index.load(args.index, pipeline=pipe)
    hits = index.search(text=args.text, image=args.image, video=args.video, k=args.k, rerank=args.rerank)
    if args.json:
        print(json.dumps([hit.to_dict() for hit in hits], indent=2))
    else:
        for rank, hit in enumerate(hits, 1):
            print(f"{rank:>3}  {hit.score:+.4f}  {hit.id}")
    return 0


def cmd_vqa(args: argparse.Namespace) -> int:
    pipe = _pipeline(args)
    if args.video:
        answers = pipe.answer_pixels("video", pipe.read_video(args.video)[None], [args.question], args.topk)[0]
    else:
        answers = pipe.answer_pixels("image", pipe.read_image(args.image)[None], [args.question], args.topk)[0]
    if args.json:
        print(json.dumps([{"answer": a, "probability": p} for a, p in answers], indent=2))
    else:
        for answer, probability in answers:
            print(f"{probability:.4f}  {answer}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from mmfm.inference.pipeline import check_labels, parse_labels, top_labels

    labels, templates = check_labels(parse_labels(args.labels), args.templates)
    ranked = top_labels(_pipeline(args).classify(args.image, labels, templates), labels, args.topk)
    if args.json:
        print(json.dumps([{"image": image, "labels": [{"label": label, "probability": p} for label, p in top]}
                          for image, top in zip(args.image, ranked)], indent=2))
        return 0
    for image, top in zip(args.image, ranked):
        if len(args.image) > 1:
            print(image)
        for label, probability in top:
            print(f"{probability:.4f}  {label}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mmfm.inference.index import Index
    from mmfm.inference.server import serve

    pipe = _pipeline(args)
    index = Index.load(args.index, pipeline=pipe) if args.index else None
    serve(pipe, index, args.host, args.port, args.max_upload_mb, args.batch_wait_ms, args.max_decode_pixels)
    return 0
