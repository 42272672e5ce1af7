"""The lmms-eval model, against a minimal stand-in of lmms-eval's API (``lmms`` base class, registries).

The real package is tested by tests/test_lmms_eval_real.py (run by .ci/lmms-eval). Here: registration,
the request handling lmms-eval's own models do (``until``, batch sizes, chat templates, sampling, every
image of a document, rank and device), the layer-list syntax and refused argument combinations, on the
shipped toy (trained, so its answers are words).
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import subprocess
import sys
import types
from importlib.metadata import entry_points

import pytest
import torch

import skipvlm
from skipvlm import toy
from skipvlm.data.chat import ChatCollator
from skipvlm.data.synthetic import SyntheticTask

SHIPPED = str(toy.SHIPPED)
TOKENS = 8


@dataclasses.dataclass(frozen=True)
class Manifest:  # lmms_eval.models.registry_v2.ModelManifest's fields
    model_id: str
    simple_class_path: str | None = None
    chat_class_path: str | None = None
    aliases: tuple = ()


def _stub_lmms_eval() -> dict[str, types.ModuleType]:
    class Lmms:
        def __init__(self):
            self._rank, self._world_size, self.task_dict = 0, 1, {}
            self.cache_hook = types.SimpleNamespace(add_partial=lambda *a: None)

        @property
        def rank(self):
            return self._rank

        @property
        def world_size(self):
            return self._world_size

    registry = types.ModuleType("lmms_eval.api.registry")
    registry.MODEL_REGISTRY = {}

    def register_model(*names):
        def decorate(cls):
            registry.MODEL_REGISTRY.update(dict.fromkeys(names, cls))
            return cls

        return decorate

    registry.register_model = register_model
    model = types.ModuleType("lmms_eval.api.model")
    model.lmms = Lmms
    v2 = types.ModuleType("lmms_eval.models.registry_v2")
    v2.ModelManifest = Manifest
    models = types.ModuleType("lmms_eval.models")
    manifests: dict[str, Manifest] = {}
    models.MODEL_REGISTRY_V2 = types.SimpleNamespace(
        manifests=manifests, register_manifest=lambda m, overwrite=False: manifests.update({m.model_id: m})
    )
    models.AVAILABLE_MODELS = {}
    return {
        "lmms_eval": types.ModuleType("lmms_eval"),
        "lmms_eval.api": types.ModuleType("lmms_eval.api"),
        "lmms_eval.api.model": model,
        "lmms_eval.api.registry": registry,
        "lmms_eval.models": models,
        "lmms_eval.models.registry_v2": v2,
    }


@pytest.fixture(scope="module")
def bridge():
    """``skipvlm.lmms_eval`` imported against the stand-in (removed again afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        stubs = _stub_lmms_eval()
        for name, module in stubs.items():
            mp.setitem(sys.modules, name, module)
        mp.delitem(sys.modules, "skipvlm.lmms_eval", raising=False)
        module = importlib.import_module("skipvlm.lmms_eval")
        module.stubs = stubs
        yield module
        sys.modules.pop("skipvlm.lmms_eval", None)


@pytest.fixture(scope="module")
def docs():
    examples = SyntheticTask(families=("colorat", "anycolor", "colors")).examples(5, "val", seed=7)
    return [{"question": ex.prompt, "answer": ex.answer, "image": ex.image} for ex in examples]


@pytest.fixture(scope="module")
def lm(bridge, docs):
    model = bridge.SkipVLM(pretrained=SHIPPED, skip_attention="3+5", device="cpu", max_new_tokens=TOKENS)
    model.task_dict = {"boards": {"test": docs}}
    return model


def request(doc_id: int, gen_kwargs=None, context=None, docs=None, visual="image", task="boards"):
    """An lmms-eval request's args: (context, generation settings, doc_to_visual, doc id, task, split)."""
    context = context if context is not None else docs[doc_id]["question"]

    def to_visual(doc):
        return doc[visual] if isinstance(doc[visual], list) else [doc[visual]]

    args = (context, gen_kwargs or {}, to_visual if visual else None, doc_id, task, "test")
    return types.SimpleNamespace(args=args)


def reference(lm, docs, ids=None, **generate) -> list[str]:
    """Greedy answers of ``lm.model`` through skipvlm's own collator (what `skipvlm eval` runs)."""
    from skipvlm.data.chat import ChatExample

    ids = range(len(docs)) if ids is None else ids
    collator = ChatCollator(lm.processor)
    out = []
    for i in ids:
        batch = collator([ChatExample(docs[i]["question"], "", docs[i]["image"])], train=False)
        with torch.no_grad():
            new = lm.model.generate(**batch, max_new_tokens=TOKENS, do_sample=False, **generate)
        out.append(decode(lm, new, batch))
    return out


def decode(lm, ids: torch.Tensor, batch: dict) -> str:
    return lm.tokenizer.decode(ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def spy(monkeypatch, lm) -> list[dict]:
    calls = []
    generate = lm.model.generate

    def recording(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(lm.model, "generate", recording)
    return calls


# --- registration ---------------------------------------------------------------------------------------


def test_registers_in_every_registry_lmms_eval_has(bridge):
    stubs = bridge.stubs
    assert stubs["lmms_eval.api.registry"].MODEL_REGISTRY["skipvlm"] is bridge.SkipVLM
    manifest = stubs["lmms_eval.models"].MODEL_REGISTRY_V2.manifests["skipvlm"]
    assert manifest.simple_class_path == "skipvlm.lmms_eval.SkipVLM"
    assert stubs["lmms_eval.models"].AVAILABLE_MODELS["skipvlm"] == "skipvlm.lmms_eval.SkipVLM"


def test_the_entry_point_names_the_model_class_and_imports_no_lmms_eval(bridge):
    (point,) = [p for p in entry_points(group="lmms_eval.models") if p.name == "skipvlm"]
    manifest = point.load()()  # what lmms-eval's registry does with it
    assert manifest == Manifest(model_id="skipvlm", simple_class_path="skipvlm.lmms_eval.SkipVLM")
    module, name = manifest.simple_class_path.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is bridge.SkipVLM
    check = (
        "import sys, skipvlm, skipvlm.lmms_eval_plugin; print([m for m in sys.modules if 'lmms_eval' in m])"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['skipvlm.lmms_eval_plugin']"


# --- requests -------------------------------------------------------------------------------------------


def test_answers_equal_skipvlm_generation_in_order_across_batches(lm, docs):
    # two generation settings interleaved: grouped into batches, answered in the order asked
    requests = [request(i, {"max_new_tokens": TOKENS + (i % 2)}, docs=docs) for i in range(len(docs))]
    lm._batch = 2
    assert lm.generate_until(requests) == reference(lm, docs)
    assert skipvlm.current_plan(lm.model) == skipvlm.Plan(skip_attention=[3, 5])


def test_until_is_a_stop_string_or_a_list_without_empty_ones(lm, docs):
    expected = reference(lm, docs)
    word = next(a for a in expected if len(a) >= 3)
    i = expected.index(word)
    assert lm.generate_until([request(i, {"until": "Question:"}, docs=docs)]) == [
        word
    ]  # not letter by letter
    assert lm.generate_until([request(i, {"until": ["", "\n"]}, docs=docs)]) == [word]
    assert lm.generate_until([request(i, {"until": [word[1:3]]}, docs=docs)]) == [word[:1]]
    with pytest.raises(ValueError, match="until=5 must be a string or a list"):
        lm.generate_until([request(i, {"until": 5}, docs=docs)])


@pytest.mark.parametrize("batch_size", [1, "3", "auto", "auto:4"])
def test_batch_size_takes_the_forms_lmms_eval_passes(bridge, docs, batch_size):
    lm = bridge.SkipVLM(pretrained=SHIPPED, batch_size=batch_size, max_new_tokens=TOKENS, device="cpu")
    lm.task_dict = {"boards": {"test": docs}}
    assert lm.batch_size == {1: 1, "3": 3, "auto": 32, "auto:4": 32}[batch_size]
    assert lm.generate_until([request(i, docs=docs) for i in range(len(docs))]) == reference(lm, docs)
    with pytest.raises(ValueError, match=r"batch_size='x'.*'auto' or 'auto:N'"):
        bridge.SkipVLM(pretrained=SHIPPED, batch_size="x")


def test_auto_batch_size_halves_on_out_of_memory(bridge, docs, monkeypatch):
    lm = bridge.SkipVLM(pretrained=SHIPPED, batch_size="auto", max_batch_size=8, max_new_tokens=TOKENS)
    lm.task_dict = {"boards": {"test": docs}}
    generate = lm.model.generate

    def small_memory(**kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return generate(**kwargs)

    monkeypatch.setattr(lm.model, "generate", small_memory)
    assert lm.generate_until([request(i, docs=docs) for i in range(len(docs))]) == reference(lm, docs)
    assert lm.batch_size == 2
    fixed = bridge.SkipVLM(pretrained=SHIPPED, batch_size=4, max_new_tokens=TOKENS)
    fixed.task_dict = lm.task_dict
    monkeypatch.setattr(fixed.model, "generate", small_memory)
    with pytest.raises(torch.OutOfMemoryError):
        fixed.generate_until([request(i, docs=docs) for i in range(len(docs))])


def test_chat_template_from_the_processor(bridge, lm, docs, tmp_path):
    assert lm.chat_template == toy.CHAT_TEMPLATE
    rendered = lm.apply_chat_template([{"role": "user", "content": docs[0]["question"]}])
    assert rendered == f"USER: {docs[0]['question']} ASSISTANT:"
    # lmms-eval's --apply_chat_template hands the rendered chat back as the context: the images go in
    templated = [request(0, context=rendered, docs=docs), request(1, docs=docs)]
    assert lm.generate_until(templated) == reference(lm, docs, [0, 1])

    # no template: the prompt format the model was trained on, and --apply_chat_template is refused
    shutil.copytree(SHIPPED, tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").unlink()
    plain = bridge.SkipVLM(pretrained=str(tmp_path / "plain"), max_new_tokens=TOKENS)
    plain.task_dict = lm.task_dict
    assert plain.chat_template is None
    assert plain.generate_until([request(0, docs=docs)]) == reference(plain, docs, [0])
    with pytest.raises(ValueError, match="has no chat template; run without --apply_chat_template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sampling_arguments_reach_generate(lm, docs, monkeypatch):
    calls = spy(monkeypatch, lm)
    torch.manual_seed(0)
    lm.generate_until([request(0, {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 3}, docs=docs)])
    lm.generate_until([request(0, {"do_sample": True}, docs=docs)])
    lm.generate_until([request(0, {"temperature": 0, "top_p": 1.0, "do_sample": False}, docs=docs)])
    picked = [{k: c.get(k) for k in ("do_sample", "temperature", "top_p", "max_new_tokens")} for c in calls]
    assert picked == [
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 3},
        {"do_sample": True, "temperature": None, "top_p": None, "max_new_tokens": TOKENS},
        {"do_sample": False, "temperature": None, "top_p": None, "max_new_tokens": TOKENS},
    ]
    beams = lm.generate_until([request(i, {"num_beams": 2}, docs=docs) for i in range(2)])
    assert calls[-1]["num_beams"] == 2 and beams == reference(lm, docs, [0, 1], num_beams=2)


def test_every_image_of_a_document_goes_to_the_model(lm, docs, monkeypatch):
    two = {"question": "what colors are there ?", "images": [docs[0]["image"], docs[1]["image"]]}
    monkeypatch.setitem(lm.task_dict, "multi", {"test": [two]})
    monkeypatch.setitem(lm.task_dict, "video", {"test": [{"question": "q", "video": "clip.mp4"}]})
    calls = spy(monkeypatch, lm)
    (answer,) = lm.generate_until([request(0, docs=[two], visual="images", task="multi")])
    assert calls[0]["pixel_values"].shape[0] == 2
    image_tokens = int((calls[0]["input_ids"] == lm.model.config.image_token_id).sum())
    assert image_tokens == 2 * toy.ToyConfig().image_tokens
    prompt = "USER: <image>\n<image>\nwhat colors are there ? ASSISTANT:"
    inputs = lm.processor(text=[prompt], images=two["images"], return_tensors="pt")
    with torch.no_grad():
        ids = lm.model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
    assert answer == decode(lm, ids, inputs)

    placed = request(0, context="<image> what colors are there ?", visual="images", task="multi")
    with pytest.raises(ValueError, match=r"holds 1 <image> placeholder\(s\) for 2 image\(s\)"):
        lm.generate_until([placed])
    with pytest.raises(ValueError, match=r"document 0 of video/test gives a str visual.*image tasks only"):
        lm.generate_until([request(0, context="q", visual="video", task="video")])


def test_a_text_only_model_refuses_images_by_count(bridge, docs, tmp_path):
    import transformers as tf

    from conftest import TOY_WORDS, text_config_kwargs

    tokenizer = toy.build_tokenizer(TOY_WORDS)
    tf.LlamaForCausalLM(tf.LlamaConfig(**text_config_kwargs(vocab_size=len(tokenizer)))).save_pretrained(
        tmp_path
    )
    tokenizer.save_pretrained(tmp_path)
    lm = bridge.SkipVLM(pretrained=str(tmp_path), max_new_tokens=2)
    lm.task_dict = {"boards": {"test": docs}}
    with pytest.raises(
        ValueError, match=r"document 0 of boards/test has 1 image\(s\), but .* is a text-only"
    ):
        lm.generate_until([request(0, docs=docs)])
    assert len(lm.generate_until([request(0, docs=docs, visual=None)])[0]) >= 0  # text runs


# --- arguments ------------------------------------------------------------------------------------------


def test_layer_lists_are_joined_by_plus(bridge):
    assert bridge.parse_layers("skip_attention", "3+5+7") == [3, 5, 7]
    assert bridge.parse_layers("skip_attention", 4) == [4]  # lmms-eval turns "4" into an int
    assert bridge.parse_layers("skip_mlp", "") == []
    for bad in ("3-5", "3;5", "[3,5]", 2.0, True):
        with pytest.raises(ValueError, match=r"skip_attention=.* join layer indices with '\+', e\.g\. "):
            bridge.parse_layers("skip_attention", bad)
    lm = bridge.SkipVLM(pretrained=SHIPPED, skip_attention="1+6", skip_mlp=7)
    assert skipvlm.current_plan(lm.model) == skipvlm.Plan(skip_attention=[1, 6], skip_mlp=[7])


def test_default_device_is_cuda_when_there_is_one(bridge, monkeypatch):
    one = types.SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bridge._pick_device(None, one) == torch.device("cuda")
    assert bridge._pick_device("cpu", one) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bridge._pick_device(None, one) == torch.device("cpu")
    second = types.SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cuda", 1))
    assert bridge._pick_device(None, second) == torch.device("cuda", 1)  # each process its own device


def test_rank_and_world_size_come_from_accelerate(bridge, monkeypatch):
    second = types.SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu"))
    monkeypatch.setattr(bridge, "Accelerator", lambda: second)
    lm = bridge.SkipVLM(pretrained=SHIPPED)
    assert (lm.rank, lm.world_size, lm.device, lm.accelerator) == (1, 2, torch.device("cpu"), second)


def test_conflicting_or_unknown_arguments_are_refused(bridge, tmp_path):
    model, _ = toy.load_toy()
    skipvlm.get_eas_model(model, skipvlm.EASConfig(skip_attention=[2, 3])).save_pretrained(
        tmp_path / "adapters"
    )
    adapters = str(tmp_path / "adapters")
    with pytest.raises(
        ValueError, match=r"skip_attention=5 conflicts with the adapters in .*adapters, trained "
    ):
        bridge.SkipVLM(pretrained=SHIPPED, adapters=adapters, skip_attention=5)
    agreed = bridge.SkipVLM(pretrained=SHIPPED, adapters=adapters, skip_attention="2+3")
    assert skipvlm.current_plan(agreed.model) == skipvlm.Plan(skip_attention=[2, 3])
    with pytest.raises(ValueError, match="merge=static folds adapters into the model; give adapters="):
        bridge.SkipVLM(pretrained=SHIPPED, merge="static")
    with pytest.raises(ValueError, match=r"merge=per_example .* use batch_size=1"):
        bridge.SkipVLM(pretrained=SHIPPED, adapters=adapters, merge="per_example", batch_size=4)
    with pytest.raises(TypeError, match=r"unknown skipvlm model argument\(s\) \['skip_attn'\]"):
        bridge.SkipVLM(pretrained=SHIPPED, skip_attn="1")


def test_a_folder_that_cannot_be_loaded_is_named(bridge, tmp_path):
    with pytest.raises(
        ValueError, match=f"cannot load the model folder {tmp_path / 'missing'}: .*config.json"
    ):
        bridge.SkipVLM(pretrained=str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(ValueError, match=f"cannot load the model folder {tmp_path / 'broken'}"):
        bridge.SkipVLM(pretrained=str(tmp_path / "broken"))
