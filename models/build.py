"""Build offline stand-ins for the hub models, from configs with seeded random weights.

flickd's defaults are the real hub checkpoints, which need network access. Tests, benchmarks and
air-gapped demos use models built here instead: the same architectures (``tiny`` shrunk for
tests, ``base`` at the real models' sizes so benchmarks measure realistic compute), saved with
``save_pretrained`` and loaded through exactly the code path a hub id takes. Their *outputs* are
meaningless, but every tensor flows through the real model code.

    python -m models.build DIR --size tiny|base [--seed N]

writes ``DIR/detector`` (set ``FLICKD_DETECTOR_MODEL`` to it) and ``DIR/clip``
(``FLICKD_EMBEDDING_MODEL``).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from models.labels import FASHIONPEDIA_NAMES, FEED_SYNONYMS, NUM_LABELS, label_by_name
from models.loading import quiet_progress_bars
from models.prompts import FALLBACK_NOUN, TEMPLATES

if TYPE_CHECKING:
    from transformers import YolosForObjectDetection

Size = Literal["tiny", "base"]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408  # the real CLIP text vocabulary; ``base`` keeps its embedding table size


@dataclass(frozen=True)
class _Spec:
    # YOLOS
    det_hidden: int
    det_layers: int
    det_heads: int
    det_intermediate: int
    det_image_size: tuple[int, int]  # (height, width) of the position-embedding grid
    det_tokens: int
    det_mid_pe: bool
    # CLIP
    vis_hidden: int
    vis_layers: int
    vis_heads: int
    vis_intermediate: int
    vis_image: int
    vis_patch: int
    txt_hidden: int
    txt_layers: int
    txt_heads: int
    txt_intermediate: int
    projection: int


SPECS: dict[str, _Spec] = {
    # Small enough that building and running both models stays well under a second on 2 cores.
    "tiny": _Spec(
        det_hidden=32,
        det_layers=2,
        det_heads=2,
        det_intermediate=64,
        det_image_size=(64, 96),
        det_tokens=20,
        det_mid_pe=True,
        vis_hidden=32,
        vis_layers=2,
        vis_heads=2,
        vis_intermediate=64,
        vis_image=32,
        vis_patch=8,
        txt_hidden=32,
        txt_layers=2,
        txt_heads=2,
        txt_intermediate=64,
        projection=32,
    ),
    # YOLOS-small as fine-tuned on Fashionpedia (valentinafeve/yolos-fashionpedia; 30.7 M
    # parameters, mid-layer position embeddings included) and CLIP ViT-B/32
    # (openai/clip-vit-base-patch32; 151.3 M).
    "base": _Spec(
        det_hidden=384,
        det_layers=12,
        det_heads=6,
        det_intermediate=1536,
        det_image_size=(512, 864),
        det_tokens=100,
        det_mid_pe=True,
        vis_hidden=768,
        vis_layers=12,
        vis_heads=12,
        vis_intermediate=3072,
        vis_image=224,
        vis_patch=32,
        txt_hidden=512,
        txt_layers=12,
        txt_heads=8,
        txt_intermediate=2048,
        projection=512,
    ),
}


# --- tokenizer ------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map, so BPE never sees raw bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def tokenizer_words() -> list[str]:
    """Every word flickd itself writes into prompts, plus the feed-category vocabulary."""
    from models.colour import COLOUR_FAMILIES, colour_table

    texts: list[str] = [*TEMPLATES, FALLBACK_NOUN, "a an pair of", *FASHIONPEDIA_NAMES]
    texts += [label_by_name(name).noun for name in FASHIONPEDIA_NAMES]
    texts += [syn for synonyms in FEED_SYNONYMS.values() for syn in synonyms]
    texts += [*colour_table()[0], *COLOUR_FAMILIES]
    return sorted({w for text in texts for w in re.findall(r"[a-z]+", text.lower())})


def learn_bpe(words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-level BPE merges, learned until every word is a single token.

    Deterministic (ties go to the lexicographically smallest pair), unlike the ``tokenizers``
    trainer, whose tie-breaking follows hash order: the same seed must build the same model.
    """
    encoder = bytes_to_unicode()
    seqs: list[list[str]] = []
    for word in sorted(set(words)):
        symbols = [encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        seqs.append(symbols)
    counts: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in itertools.pairwise(seq):
            counts[pair] += 1
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry
        merges.append(pair)
        for i in sorted(where.pop(pair, ())):
            old = seqs[i]
            for p in itertools.pairwise(old):
                counts[p] -= 1
                where[p].discard(i)
            new: list[str] = []
            j = 0
            while j < len(old):
                if j + 1 < len(old) and (old[j], old[j + 1]) == pair:
                    new.append(old[j] + old[j + 1])
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            seqs[i] = new
            changed = set(itertools.pairwise(old)) | set(itertools.pairwise(new))
            for p in itertools.pairwise(new):
                counts[p] += 1
                where[p].add(i)
            for p in changed:
                if counts[p] > 0:
                    heapq.heappush(heap, (-counts[p], p))
        counts.pop(pair, None)
    return merges


def build_clip_tokenizer(words: Iterable[str] | None = None) -> Any:
    """A ``CLIPTokenizer`` over a small learned vocabulary, laid out like CLIP's own: the 256 byte
    symbols, the same with the end-of-word marker, one token per merge, then the two specials
    last (CLIP's pooling finds the end token by its position, not its id, when ``eos_token_id``
    is set properly, but keeping the layout avoids surprises)."""
    from transformers import CLIPTokenizer

    merges = learn_bpe(tokenizer_words() if words is None else words)
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(pair) for pair in merges]
    vocab: dict[str, int] = {}
    for token in [*tokens, BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]  # BPE takes (left, right) pairs; transformers annotates only strings


# --- detector -------------------------------------------------------------------------------------
def _image_processor_class(name: str) -> Any:
    """transformers 5 splits processors into a torchvision class and a ``…Pil`` one; without
    torchvision only the latter constructs. Both save the same backend-neutral config."""
    import transformers

    try:
        import torchvision  # noqa: F401

        return getattr(transformers, name)
    except ImportError:
        return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def _redraw_detector_weights(model: YolosForObjectDetection, generator: torch.Generator) -> None:
    """Re-draw weights so that a *random* YOLOS gives non-degenerate, image-dependent outputs.

    With transformers' init (detection tokens and position embeddings zero, every linear layer
    std 0.02) all detection tokens are identical, every class score is about 1/47 and the image
    barely moves the logits: nothing would pass a 0.5 threshold, and a bug that swapped images
    within a batch would go unnoticed. Instead:

    - encoder linear/conv layers get variance-preserving (LeCun normal) init, so the image
      actually propagates to the detection tokens;
    - detection and class tokens get the original YOLOS trunc-normal-like std 0.02 (distinct
      tokens), position embeddings likewise;
    - head layers get He init, and their last layers a scale that spreads class logits
      (std ~3) and box coordinates over their ranges.

    The result is still random weights run through the real forward pass; only their scale is
    chosen, so that tests at the production threshold see detections, garment parts included.
    """
    embeddings = model.vit.embeddings
    with torch.no_grad():
        for module in model.vit.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) / fan_in**0.5
                )
        for param in (
            embeddings.cls_token,
            embeddings.detection_tokens,
            embeddings.position_embeddings,
        ):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        for head, final_std in ((model.class_labels_classifier, 3.0), (model.bbox_predictor, 1.0)):
            layers = cast("list[torch.nn.Linear]", list(head.layers))  # an MLP of nn.Linear
            for layer in layers:
                fan_in = layer.weight.shape[1]
                std = (2.0 / fan_in) ** 0.5 if layer is not layers[-1] else final_std / fan_in**0.5
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
                layer.bias.zero_()


def build_detector(out_dir: Path, spec: _Spec, generator: torch.Generator) -> Path:
    from transformers import YolosConfig, YolosForObjectDetection

    config = YolosConfig(
        hidden_size=spec.det_hidden,
        num_hidden_layers=spec.det_layers,
        num_attention_heads=spec.det_heads,
        intermediate_size=spec.det_intermediate,
        image_size=list(spec.det_image_size),
        patch_size=16,
        num_detection_tokens=spec.det_tokens,
        use_mid_position_embeddings=spec.det_mid_pe,
        id2label=dict(enumerate(FASHIONPEDIA_NAMES)),
        label2id={name: i for i, name in enumerate(FASHIONPEDIA_NAMES)},
    )
    assert config.num_labels == NUM_LABELS
    model = YolosForObjectDetection(config)
    _redraw_detector_weights(model, generator)
    processor = _image_processor_class("YolosImageProcessor")(
        size={"shortest_edge": min(spec.det_image_size), "longest_edge": max(spec.det_image_size)}
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# --- CLIP -----------------------------------------------------------------------------------------
def build_clip(out_dir: Path, spec: _Spec, size: Size) -> Path:
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_clip_tokenizer()
    vocab_size = len(tokenizer)
    if size == "base":
        vocab_size = max(vocab_size, CLIP_VOCAB_SIZE)
    text = {
        "vocab_size": vocab_size,
        "hidden_size": spec.txt_hidden,
        "intermediate_size": spec.txt_intermediate,
        "num_hidden_layers": spec.txt_layers,
        "num_attention_heads": spec.txt_heads,
        "max_position_embeddings": 77,
        "projection_dim": spec.projection,
        # Real token ids; an ``eos_token_id`` of 2 would switch CLIP to its legacy argmax pooling.
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": spec.vis_hidden,
        "intermediate_size": spec.vis_intermediate,
        "num_hidden_layers": spec.vis_layers,
        "num_attention_heads": spec.vis_heads,
        "image_size": spec.vis_image,
        "patch_size": spec.vis_patch,
        "projection_dim": spec.projection,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.projection)
    model = CLIPModel(config)
    processor = _image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": spec.vis_image},
        crop_size={"height": spec.vis_image, "width": spec.vis_image},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_offline_models(out_dir: Path, size: Size = "tiny", seed: int = 0) -> dict[str, Path]:
    """Build and save both models; returns ``{"detector": dir, "clip": dir}``.

    The same ``size`` and ``seed`` always give the same weights (and so the same
    ``model_version``).
    """
    if size not in SPECS:
        raise ValueError(f"size must be one of {sorted(SPECS)}, not {size!r}")
    spec = SPECS[size]
    out_dir = Path(out_dir)
    quiet_progress_bars()
    # Both the global RNG (transformers' own init) and an explicit generator (our re-draws) are
    # seeded; the global state is restored so callers' randomness is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        paths = {
            "detector": build_detector(out_dir / "detector", spec, generator),
            "clip": build_clip(out_dir / "clip", spec, size),
        }
    (out_dir / "flickd-offline-models.json").write_text(
        json.dumps({"size": size, "seed": seed, **{k: str(v) for k, v in paths.items()}}, indent=2)
    )
    return paths


def parameter_counts(paths: dict[str, Path]) -> dict[str, int]:
    """Parameters per built model, read from the saved safetensors headers (no model load)."""
    from safetensors import safe_open

    counts = {}
    for name, directory in paths.items():
        total = 0
        for file in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(file, framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    total += math.prod(fh.get_slice(key).get_shape())
        counts[name] = total
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.build", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SPECS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = build_offline_models(args.out_dir, args.size, args.seed)
    for name, count in parameter_counts(paths).items():
        print(f"{name}: {paths[name]} ({count / 1e6:.2f} M parameters)")
    print(f"FLICKD_DETECTOR_MODEL={paths['detector']}")
    print(f"FLICKD_EMBEDDING_MODEL={paths['clip']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
