"""The encoder travels with the index: ``<index-dir>/model/`` is written by every build and loaded, offline, by
``load_index`` and ``searchrl serve retriever``; a model that is not available offline fails with the way out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from searchrl.retriever.index.build import build_index
from searchrl.retriever.index.load import load_index
from searchrl.retriever.index.params import MANIFEST_FILE, read_manifest, stored_encoder_dir
from searchrl.testing import ServiceProcess

QUERIES = ["What is the population of Macau?", "Who painted the Mona Lisa?"]


@pytest.fixture(scope="module")
def index_without_its_source_model(tmp_path_factory: pytest.TempPathFactory, wiki_slice) -> Path:  # noqa: ANN001
    """A flat index built from a private copy of MiniLM (a model name nothing else resolves), copy then deleted."""
    from searchrl.assets import embedding_model_path

    root = tmp_path_factory.mktemp("own-model")
    source = root / "minilm-private-copy"
    shutil.copytree(embedding_model_path(), source)
    corpus, _ = wiki_slice
    lines = Path(corpus).read_text(encoding="utf-8").splitlines()
    keep = [ln for ln in lines if json.loads(ln)["contents"].startswith('"Macau"')] + lines[:150]
    small = root / "small.jsonl"
    small.write_text("\n".join(dict.fromkeys(keep)) + "\n", encoding="utf-8")
    report = build_index(str(small), root / "idx", model=str(source), shard_size=64, progress=False)
    shutil.rmtree(source)
    return report.index_dir


def test_the_build_stores_the_encoder_in_the_index_dir(index_without_its_source_model: Path) -> None:
    d = index_without_its_source_model
    m = read_manifest(d)
    assert m.embedding_model == "minilm-private-copy" and m.encoder_dir == "model"
    assert m.embedding_model_source.endswith("minilm-private-copy")
    assert (d / "model" / "modules.json").is_file() and stored_encoder_dir(d) == d / "model"
    assert not (d / "model.tmp").exists()


def test_load_index_uses_the_stored_encoder_when_the_source_is_gone(
    index_without_its_source_model: Path, encoder, flat_index
) -> None:  # noqa: ANN001
    loaded = load_index(index_without_its_source_model, use_gpu=False)
    assert loaded.encoder.name == "minilm-private-copy"
    # the stored weights are the model's: same vectors as the bundled MiniLM the copy came from
    assert np.allclose(loaded.encoder.encode_queries(QUERIES), encoder.encode_queries(QUERIES), atol=1e-5)
    _, rows = loaded.search(QUERIES[:1], 1)
    assert loaded.store.get(int(rows[0, 0])).title == "Macau"


def test_serve_retriever_loads_the_stored_encoder_offline_with_an_empty_hf_home(
    index_without_its_source_model: Path, tmp_path: Path
) -> None:
    import asyncio

    from searchrl.client import RetrievalClient

    empty = tmp_path / "hf-empty"
    empty.mkdir()
    with ServiceProcess(
        "retriever",
        ["--index-dir", str(index_without_its_source_model), "--http-port", "-1"],
        env={"HF_HOME": str(empty), "HF_HUB_OFFLINE": "1"},
    ) as proc:

        async def ask() -> list[str]:
            async with RetrievalClient(proc.target) as client:
                docs = await client.search(QUERIES[:1], top_k=1, skip_cache=True)
            return [d.title for d in docs[0]]

        assert asyncio.run(ask()) == ["Macau"]
        assert list(empty.iterdir()) == []  # nothing was fetched or cached


def _index_cli(args: list[str], hf_home: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")}
    env["HF_HOME"] = str(hf_home)
    return subprocess.run(
        [sys.executable, "-m", "searchrl", "index", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_model_that_is_not_available_offline_fails_naming_allow_download(tmp_path: Path, wiki_slice) -> None:  # noqa: ANN001
    corpus, _ = wiki_slice
    empty = tmp_path / "hf-empty"
    empty.mkdir()
    out = tmp_path / "e5"
    done = _index_cli(
        ["build", "--corpus", str(corpus), "--model", "intfloat/e5-base-v2", "--out", str(out), "--limit", "8"], empty
    )
    assert done.returncode == 2, done.stdout + done.stderr
    err = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, done.stderr
    assert "cannot load embedding model 'intfloat/e5-base-v2'" in err[0]
    assert "--allow-download" in err[0] and str(empty) in err[0]
    assert "Traceback" not in done.stderr
    assert not (out / MANIFEST_FILE).exists()
    assert list(empty.rglob("*.safetensors")) == []  # offline by default: nothing downloaded


def test_index_info_shows_the_stored_encoder(index_without_its_source_model: Path, capsys) -> None:  # noqa: ANN001
    from searchrl.retriever.cli import main

    assert main(["info", "--index-dir", str(index_without_its_source_model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["encoder_dir"] == "model" and info["embedding_model"] == "minilm-private-copy"
