"""The ``mmfactory`` command line.

    mmfactory reproduce [--profile quick|full]         every method's claim in miniature: the claims table
    mmfactory report RUN_DIR [--out report.html]       one self-contained HTML report of a run folder
    mmfactory recipes                                  list the shipped recipes
    mmfactory recipes show NAME [key=value]            a recipe resolved (overrides, defaults filled in)
    mmfactory recipes cp NAME DEST                     copy a shipped recipe's YAML to edit
    mmfactory run lm/tiny [--output DIR] [key=value]   run a recipe's stages (resumes where it stopped)
    mmfactory generate --model DIR --prompt "..."      reply with a trained chat model
    mmfactory generate ... --image PNG                 ask a multimodal model about an image
    mmfactory generate ... --video MP4 [--audio WAV]   ask an audio-visual model about a video and / or audio
    mmfactory generate --model DIR --prompt ... --out DIR   draw PNGs with a MARS (mars_t2i) model
    mmfactory eval --model DIR                         a multimodal model's VQA / POPE / caption scores
                                                       (audio-visual models: video / audio / AV QA, captions)
    mmfactory eval --model DIR --benchmark pope=FILE   ... on benchmark files (pope, vqa, captions, mmbench)
    mmfactory export RUN/STAGE --to llava-hf --out DIR  a multimodal model as transformers' LLaVA
    mmfactory world export --out DIR [--size small]    write the built-in world in real file formats

Several processes: ``torchrun --nproc_per_node N -m mmfactory.cli run ...`` or ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

from mmfactory.config import ConfigError
from mmfactory.data.policy import BadSampleError, DataError


def _cmd_recipes(args: argparse.Namespace) -> int:
    from mmfactory.config import load_recipe
    from mmfactory.recipes import list_recipes, resolve_recipe

    if args.recipes_command == "show":
        return _show_recipe(args)
    if args.recipes_command == "cp":
        return _copy_recipe(args)
    for name in list_recipes():
        recipe = load_recipe(resolve_recipe(name))
        print(f"{name:<24} {recipe.description}")
    return 0


def _show_recipe(args: argparse.Namespace) -> int:
    """The recipe as a run would use it: overrides applied, every stage validated, defaults filled in."""
    import yaml

    from mmfactory.config import load_recipe, to_dict
    from mmfactory.recipes import resolve_recipe
    from mmfactory.tasks import validate_stage

    recipe = load_recipe(resolve_recipe(args.name), args.overrides)
    # every stage complete (defaults merged in), so the printed file runs as it reads: `mmfactory run FILE`
    resolved = {key: value for key, value in to_dict(recipe).items() if key not in ("source", "defaults")}
    for index, stage in enumerate(recipe.stages):
        _, model_cfg, data_cfg, options = validate_stage(stage, index)  # the task's schemas, defaults filled
        resolved["stages"][index].update(
            model=to_dict(model_cfg), data=to_dict(data_cfg), options=to_dict(options)
        )
    print(f"# {args.name} resolved from {recipe.source}" + "".join(f" {o}" for o in args.overrides))
    print(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), end="")
    return 0


def _copy_recipe(args: argparse.Namespace) -> int:
    """The shipped YAML file as written (comments kept), to edit and run as ``mmfactory run DEST``."""
    import shutil

    from mmfactory.recipes import resolve_recipe

    source, dest = resolve_recipe(args.name), Path(args.dest)
    if dest.is_dir() or args.dest.endswith(("/", "\\")):
        dest = dest / source.name
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest} exists; pass --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    print(f"{args.name} -> {dest}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from mmfactory.config import load_recipe
    from mmfactory.recipes import resolve_recipe
    from mmfactory.runner import run_recipe

    recipe = load_recipe(resolve_recipe(args.recipe), args.overrides)
    output = Path(args.output) if args.output else Path("runs") / recipe.name.replace("/", "-")
    run_recipe(recipe, output, rerun_stale=not args.no_rerun_stale)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from mmfactory.reproduce.run import format_claims, reproduce

    only = [name.strip() for name in args.only.split(",")] if args.only else None
    out = Path(args.output or f"runs/reproduce-{args.profile}")
    rows, errors = reproduce(out, args.profile, only, args.seeds, args.overrides)
    print(format_claims(rows, args.profile))
    print(f"claims table: {out / 'claims.md'}; report: mmfactory report {out}")
    for line in errors:
        print(f"mmfactory: {line}", file=sys.stderr)
    return 1 if errors else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mmfactory.report import write_report

    path = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"report: {path.resolve()}")
    return 0


def _model_folder(args: argparse.Namespace) -> None:
    """``--model`` as a local folder: a hub id is resolved (from the cache under ``HF_HUB_OFFLINE``)."""
    from mmfactory.models.hub import resolve_model_folder

    try:
        args.model = str(resolve_model_folder(args.model, "--model"))
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None


def _cmd_generate(args: argparse.Namespace) -> int:
    _model_folder(args)
    if (Path(args.model) / "t2i.json").is_file():
        return _draw(args)
    if args.image:
        return _generate_about_image(args)
    if args.video or args.audio:
        return _generate_about_media(args)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmfactory.data.chat import resolve_template
    from mmfactory.models.generation import GenerationConfig, generate_replies
    from mmfactory.tasks.causal_lm import CHAT_META

    model_dir = Path(args.model)
    meta = model_dir / CHAT_META
    template = args.template or (json.loads(meta.read_text())["template"] if meta.is_file() else "chatml")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(args.seed)
    temperature = args.temperature or 0.0
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0
    )
    conversations = [[{"role": "user", "content": p}] for p in args.prompt]
    for prompt, reply in zip(
        args.prompt,
        generate_replies(model, tokenizer, resolve_template(template, tokenizer), conversations, cfg),
        strict=True,
    ):
        print(f">>> {prompt}\n{reply}\n")
    return 0


def _generate_about_image(args: argparse.Namespace) -> int:
    import torch

    from mmfactory.data.media import load_image
    from mmfactory.eval.mllm import generate_multimodal_replies, load_mllm
    from mmfactory.models.generation import GenerationConfig

    model, processor = load_mllm(args.model)
    image = load_image(args.image)
    torch.manual_seed(args.seed)
    temperature = args.temperature or 0.0
    sampling = {"do_sample": temperature > 0, "temperature": temperature or 1.0}
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, **sampling)
    conversations = [[{"role": "user", "content": f"{processor.image_token}\n{p}"}] for p in args.prompt]
    replies = generate_multimodal_replies(model, processor, conversations, [[image]] * len(args.prompt), cfg)
    for prompt, reply in zip(args.prompt, replies, strict=True):
        print(f">>> {prompt}\n{reply}\n")
    return 0


def _generate_about_media(args: argparse.Namespace) -> int:
    import torch

    from mmfactory.data.media import load_audio, load_video
    from mmfactory.data.readers.av_formats import VIDEO_FRAMES
    from mmfactory.eval.av import ask, load_av
    from mmfactory.eval.mllm import generate_multimodal_replies
    from mmfactory.models.generation import GenerationConfig

    model, processor = load_av(args.model)
    rate = processor.feature_extractor.sampling_rate
    video = audio = None
    if args.video:
        # as the file readers decode a video: up to VIDEO_FRAMES uniform frames; the processor samples its own
        clip = load_video(args.video, VIDEO_FRAMES, with_audio=True, audio_sample_rate=rate)
        video = clip.frames[: len(clip.frames) - clip.num_padded_frames]
        audio = clip.audio
        if audio is None and not args.audio:
            print(f"{args.video} has no audio track: answering from the video alone")
    if args.audio:
        audio = load_audio(args.audio, expected_sr=rate, resample=True)[0]
    streams = tuple(name for name, value in (("video", video), ("audio", audio)) if value is not None)
    torch.manual_seed(args.seed)
    temperature = args.temperature or 0.0
    sampling = {"do_sample": temperature > 0, "temperature": temperature or 1.0}
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, **sampling)
    media = {"video": video, "audio": audio, "sample_rate": rate}
    conversations = [ask(p, streams) for p in args.prompt]
    replies = generate_multimodal_replies(model, processor, conversations, [media] * len(args.prompt), cfg)
    for prompt, reply in zip(args.prompt, replies, strict=True):
        print(f">>> {prompt}\n{reply}\n")
    return 0


def _draw(args: argparse.Namespace) -> int:
    from mmfactory.mars.generate import draw_to_folder, load_t2i_folder
    from mmfactory.mars.sampling import SamplingConfig

    if not args.out:
        raise ConfigError(f"--out: {args.model} is a text-to-image model; name a folder for its PNGs")
    temperature = 1.0 if args.temperature is None else args.temperature
    sampling = SamplingConfig(
        cfg_scale=args.cfg_scale, temperature=temperature, top_k=args.top_k, top_p=args.top_p
    )
    sampling.validate()
    folder = load_t2i_folder(Path(args.model))
    out = Path(args.out)
    paths = draw_to_folder(folder, args.prompt, out, sampling, args.num_images, args.seed, joint=args.joint)
    print(f"wrote {len(paths)} images to {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mmfactory.data.world_source import world_benchmarks
    from mmfactory.eval.mllm import evaluate_mllm, load_mllm
    from mmfactory.models.generation import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    _model_folder(args)
    config = json.loads((Path(args.model) / "config.json").read_text())
    if args.benchmark:
        return _evaluate_benchmark_files(args, cfg, config.get("model_type"))
    if args.image_root or args.limit is not None or args.strict or args.output or args.caption_prompt:
        raise ConfigError("--image-root, --limit, --strict, --output, --caption-prompt go with --benchmark")
    if config.get("model_type") == "mmfactory_av_llm":
        metrics = _evaluate_av_folder(args, cfg)
    else:
        model, processor = load_mllm(args.model)
        benchmarks = world_benchmarks(args.vqa, args.pope, args.captions, seed=args.seed, split=args.split)
        metrics = evaluate_mllm(model, processor, benchmarks, cfg)
    for key, value in metrics.items():
        print(f"{key:<36} {value:.4f}")
    return 0


def _evaluate_benchmark_files(args: argparse.Namespace, cfg, model_type: str | None) -> int:
    """``--benchmark KIND=FILE`` files in their official formats (docs/evaluating.md): a table, and the
    metrics, ``n`` and ``skipped`` of each file as JSON with ``--output``."""
    from mmfactory.atomic import write_atomic
    from mmfactory.eval.external import (
        EvalFileOptions,
        evaluate_files,
        format_results,
        model_answerer,
        parse_benchmark,
    )
    from mmfactory.eval.mllm import load_mllm

    if model_type != "mmfactory_mllm":
        raise ConfigError(
            f"--benchmark: files are asked of an mllm_sft model, {args.model} is {model_type!r}"
        )
    try:
        benchmarks = [parse_benchmark(spec) for spec in args.benchmark]
    except ValueError as error:
        raise ConfigError(f"--benchmark: {error}") from None
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: a number of records, at least 1, not {args.limit}")
    options = EvalFileOptions(
        image_root=Path(args.image_root) if args.image_root else None,
        limit=args.limit,
        strict=args.strict,
        caption_prompt=args.caption_prompt or EvalFileOptions.caption_prompt,
        max_new_tokens=args.max_new_tokens,
    )
    model, processor = load_mllm(args.model)
    try:
        results = evaluate_files(benchmarks, model_answerer(model, processor, cfg), options)
    except BadSampleError as error:
        print(f"mmfactory: bad record: {error} (without --strict it is skipped and counted)", file=sys.stderr)
        return 2
    print(format_results(results))
    if args.output:
        out = {"model": args.model, "benchmarks": {name: r.to_json() for name, r in results.items()}}
        write_atomic(Path(args.output), json.dumps(out, indent=2) + "\n")
        print(f"results: {args.output}")
    return 0


def _evaluate_av_folder(args: argparse.Namespace, cfg) -> dict[str, float]:
    """An audio-visual model on the world's held-out audio-visual benchmarks (``--vqa`` questions of each
    QA kind, ``--captions`` clips of each captioning kind), asked with ``--streams``."""
    from mmfactory.data.world_source import world_av_benchmarks
    from mmfactory.eval.av import evaluate_av, load_av
    from mmfactory.tasks.av_llm import AVEvalOptions

    streams = [s for s in args.streams.split(",") if s]
    if not streams or set(streams) - {"video", "audio"}:
        raise ConfigError(f"--streams: name video, audio or both (comma-separated), got {args.streams!r}")
    if args.split not in ("val", "test"):
        raise ConfigError(f"--split: the world's clips have val and test splits, not {args.split!r}")
    qa = ("video_qa", "audio_qa", "av_qa", "av_which")
    sizes = {name: args.vqa for name in qa} | {
        "audio_captions": args.captions,
        "video_captions": args.captions,
    }
    model, processor = load_av(args.model)
    benchmarks = world_av_benchmarks(sizes, streams, args.seed, args.split, args.frame_size)
    return evaluate_av(model, processor, benchmarks, cfg, AVEvalOptions().caption_max_new_tokens)


def _cmd_filter_score(args: argparse.Namespace) -> int:
    from mmfactory.filter_align.score import score_pool

    if args.model is None and args.scorer != "random":
        raise ConfigError(f"--model: the {args.scorer} scorer needs a model folder")
    common = (args.model, args.pool, args.out, args.scorer, args.batch_size, args.chunk, args.shard_size)
    if args.ray_workers:
        from mmfactory.filter_align.score import score_pool_ray

        summary = score_pool_ray(*common, workers=args.ray_workers, num_gpus=args.ray_gpus, seed=args.seed)
    else:
        summary = score_pool(*common, seed=args.seed)
    rate = summary["pairs"] / max(summary["seconds"], 1e-9)
    print(json.dumps({**summary, "pairs_per_s": round(rate, 1)}))
    return 0


def _cmd_filter_select(args: argparse.Namespace) -> int:
    from mmfactory.filter_align.select import select_top

    print(json.dumps(select_top(args.scores, args.out, args.keep, args.threshold)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """A stage's model (``RUN/STAGE`` or its ``final/`` folder) in another library's format, merged, or
    its LoRA adapters alone."""
    import torch

    from mmfactory.eval.mllm import load_mllm
    from mmfactory.models.lora import ADAPTER_DIR
    from mmfactory.models.mllm import export_llava

    folder = Path(args.model)
    if (folder / "final").is_dir():
        folder = folder / "final"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{args.model}: not a stage folder or a model folder (no config.json, no final/)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; name a new folder")
    if args.to == "adapter":
        if not (folder / ADAPTER_DIR).is_dir():
            raise ConfigError(f"{folder}: no {ADAPTER_DIR}/ (only stages trained with options.lora keep one)")
        shutil.copytree(folder / ADAPTER_DIR, out, dirs_exist_ok=True)
        print(f"{folder / ADAPTER_DIR} -> {out} (peft adapter: PeftModel.from_pretrained(base, '{out}'))")
        return 0
    if args.to == "merged":  # final/ already holds the merged weights: everything but the adapters
        shutil.copytree(folder, out, ignore=shutil.ignore_patterns(ADAPTER_DIR), dirs_exist_ok=True)
        print(f"{folder} -> {out} (the model with any LoRA adapters merged in)")
        return 0
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "mmfactory_mllm":
        raise ConfigError(
            f"{folder}: --to llava-hf takes an mllm_sft model (model_type mmfactory_mllm), not {model_type!r}"
        )
    model, processor = load_mllm(folder)
    try:
        export_llava(model.to(torch.device("cpu")), processor, args.out)
    except ValueError as error:
        raise ConfigError(f"{folder}: {error}") from None
    print(f"{folder} -> {args.out} (LlavaForConditionalGeneration + LlavaProcessor with the chat template)")
    return 0


def _cmd_world_export(args: argparse.Namespace) -> int:
    from mmfactory.world.export import export_world

    counts = export_world(Path(args.out), size=args.size, seed=args.seed)
    for name, count in counts.items():
        print(f"{name:<32} {count}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfactory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reproduce", help="run every method's recipe and collect the claims table")
    p.add_argument(
        "--profile",
        choices=["quick", "full"],
        default="quick",
        help="quick: reduced steps, a pipeline check (minutes); full: the recipes as shipped (hours)",
    )
    p.add_argument("--only", help="comma-separated method names, e.g. 'ARM,MAC' (default: all)")
    p.add_argument("--seeds", type=int, help="seeds per recipe (default: 1 quick, 2 full)")
    p.add_argument("--output", "-o", help="output folder (default: runs/reproduce-<profile>)")
    p.add_argument(
        "overrides", nargs="*", help="key.path=value overrides of every recipe (after the profile)"
    )
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("report", help="write a self-contained HTML report of a run or reproduce folder")
    p.add_argument("run_dir")
    p.add_argument("--out", help="the HTML file (default: RUN_DIR/report.html)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("recipes", help="list the shipped recipes; show or copy one")
    p.set_defaults(func=_cmd_recipes)
    recipes_sub = p.add_subparsers(dest="recipes_command")
    show = recipes_sub.add_parser(
        "show", help="print a recipe resolved: overrides applied, defaults filled in"
    )
    show.add_argument("name", help="a shipped name like llava/tiny, or a YAML path")
    show.add_argument("overrides", nargs="*", help="key.path=value, as for run")
    copy = recipes_sub.add_parser("cp", help="copy a shipped recipe's YAML (comments kept) to edit it")
    copy.add_argument("name")
    copy.add_argument("dest", help="a file or a folder")
    copy.add_argument("--force", action="store_true", help="overwrite an existing file")

    p = sub.add_parser("run", help="run a recipe (a shipped name like lm/tiny or a YAML path)")
    p.add_argument("recipe")
    p.add_argument("--output", "-o", help="run folder (default: runs/<recipe>)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=10")
    p.add_argument(
        "--no-rerun-stale",
        action="store_true",
        help="stop instead of rerunning a finished stage whose upstream stage or data changed",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("generate", help="generate replies with a trained chat model folder")
    p.add_argument("--model", required=True, help="a model folder (e.g. runs/lm-tiny/sft/final) or hub id")
    p.add_argument("--prompt", required=True, action="append", help="a user message (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, help="0 = greedy (default for text; 1 for images)")
    p.add_argument(
        "--template", choices=["chatml", "llama3"], help="default: the one the model was trained with"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", help="ask the prompts about this image (a multimodal model folder)")
    p.add_argument("--video", help="ask about this video and its audio track (an audio-visual model folder)")
    p.add_argument(
        "--audio", help="ask about this audio file (any rate, mono or stereo; with --video: its sound)"
    )
    p.add_argument("--out", help="text-to-image models: the folder the PNGs are written to")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="text-to-image: guidance scale (1 = none)")
    p.add_argument("--top-k", type=int, default=32, help="text-to-image: codes kept per step (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="text-to-image: nucleus mass (1 = off)")
    p.add_argument("--num-images", type=int, default=1, help="text-to-image: images per prompt")
    p.add_argument("--joint", action="store_true", help="text-to-image: draw, then describe in text")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="score a multimodal model on the world's held-out VQA, POPE, captions")
    p.add_argument("--model", required=True, help="a model folder (runs/llava-tiny/instruct/final) or hub id")
    p.add_argument("--vqa", type=int, default=500, help="questions (0 = skip)")
    p.add_argument("--pope", type=int, default=200, help="probes per POPE split (0 = skip)")
    p.add_argument("--captions", type=int, default=100, help="images to caption (0 = skip)")
    p.add_argument("--split", default="test", choices=["val", "test", "test_compositional"])
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--streams", default="video,audio", help="audio-visual models: the streams to ask with")
    p.add_argument("--frame-size", type=int, default=32, help="audio-visual models: world video frame side")
    p.add_argument(
        "--benchmark",
        action="append",
        metavar="KIND=FILE",
        help="score a benchmark file instead of the world (repeatable): pope=, vqa=QUESTIONS[,ANSWERS], "
        "captions=, mmbench= in their official formats (docs/evaluating.md)",
    )
    p.add_argument(
        "--image-root", help="--benchmark: the folder image paths start from (default: the file's)"
    )
    p.add_argument("--limit", type=int, help="--benchmark: the first N records of each file")
    p.add_argument(
        "--strict", action="store_true", help="--benchmark: stop at a bad record, not skip and count it"
    )
    p.add_argument("--output", help="--benchmark: write metrics, n and skipped per file to this JSON file")
    p.add_argument(
        "--caption-prompt", help="--benchmark captions: the prompt (default: Describe the image briefly.)"
    )
    p.set_defaults(func=_cmd_eval)

    filt = sub.add_parser("filter", help="Filter & Align: score a pool of image-text pairs, keep its best")
    filt_sub = filt.add_subparsers(dest="filter_command", required=True)
    p = filt_sub.add_parser("score", help="score a pool with a reward model (resumable, shards per process)")
    p.add_argument(
        "--model", help="an image_text_reward / image_text_matching stage's final/, or a CLIP folder (cosine)"
    )
    p.add_argument(
        "--pool",
        required=True,
        help="world:N[:BAD], webdataset shards, JSONL or Parquet files (glob / brace pattern)",
    )
    p.add_argument("--out", required=True, help="score folder: {shard}/part-*.parquet, {shard}/DONE.json")
    p.add_argument(
        "--scorer",
        choices=["reward", "cosine", "random"],
        default="reward",
        help="reward: the model's head (a reward or matching model); cosine: CLIP score; random: a baseline",
    )
    p.add_argument("--seed", type=int, default=0, help="the random scorer's seed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=1024, help="pairs per Parquet part (the resume granularity)")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per shard of a world pool")
    p.add_argument("--ray-workers", type=int, default=0, help="score with this many Ray Data actors")
    p.add_argument("--ray-gpus", type=float, default=0, help="GPUs per Ray actor")
    p.set_defaults(func=_cmd_filter_score)
    p = filt_sub.add_parser("select", help="keep the top fraction of scored pairs (DuckDB over the scores)")
    p.add_argument("--scores", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--keep", type=float, help="fraction to keep, e.g. 0.3")
    p.add_argument("--threshold", type=float, help="keep every pair scoring at least this")
    p.set_defaults(func=_cmd_filter_select)

    p = sub.add_parser("export", help="write a trained model in another library's format")
    p.add_argument("model", help="a stage folder (RUN/STAGE) or a model folder (RUN/STAGE/final)")
    p.add_argument(
        "--to",
        required=True,
        choices=["llava-hf", "merged", "adapter"],
        help="llava-hf: transformers' LLaVA; merged: the model, LoRA merged in; adapter: a LoRA stage's "
        "adapters alone (peft)",
    )
    p.add_argument("--out", required=True, help="the folder to write")
    p.set_defaults(func=_cmd_export)

    world = sub.add_parser("world", help="the built-in procedural multimodal world")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    p = world_sub.add_parser("export", help="write the world in real file formats (docs/formats.md)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=["small", "medium"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_world_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`run lm/tiny --output D a=1`): collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None and all("=" in e for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get("MMFACTORY_DEBUG") == "1"
    try:
        return args.func(args)
    except ConfigError as err:
        return _fail(f"configuration error: {err}", 2, debug)
    except (BadSampleError, DataError) as err:
        return _fail(f"bad data: {err} (set on_bad_sample: skip on the source to skip and count)", 2, debug)
    except KeyboardInterrupt:
        return _fail("interrupted (rerun the same command to resume from the last checkpoint)", 130, debug)
    except Exception as err:  # a failed run: one line, the traceback with --debug
        return _fail(f"error: {type(err).__name__}: {err} (--debug shows the traceback)", 1, debug)


def _fail(message: str, code: int, debug: bool) -> int:
    """Print one line naming what failed (the traceback too with ``--debug`` / ``MMFACTORY_DEBUG=1``)."""
    if debug:
        traceback.print_exc()
    print(f"mmfactory: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
