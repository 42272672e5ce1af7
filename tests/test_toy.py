"""The toy's chat template: it renders the pretraining prompt token for token, ships with the checkpoint,
is written by the builder, and makes chat-style pipeline input work on a planned toy."""

from __future__ import annotations

import pytest
import torch
import transformers

import skipvlm
from skipvlm import toy
from skipvlm.data.chat import LEGACY_FORMAT, ChatCollator, ChatExample, load_processor
from skipvlm.data.synthetic import SyntheticTask


def _user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


@pytest.fixture(scope="module")
def shipped():
    return toy.load_toy()


@pytest.fixture(scope="module")
def examples():
    return SyntheticTask(families=("colorat", "anycolor")).examples(4, "val", seed=3)


def test_the_shipped_processor_loads_the_template(shipped):
    _, processor = shipped
    assert processor.chat_template == toy.CHAT_TEMPLATE
    assert (toy.SHIPPED / "chat_template.jinja").read_text() == toy.CHAT_TEMPLATE
    assert toy.build_processor(processor.tokenizer, toy.ToyConfig()).chat_template == toy.CHAT_TEMPLATE


def test_template_renders_the_pretraining_prompt_token_for_token(shipped, examples):
    _, processor = shipped
    collator = ChatCollator(processor, prompt_format=LEGACY_FORMAT)  # the hand-built pretraining layout
    for ex in examples:
        image, text = {"type": "image"}, {"type": "text", "text": ex.prompt}
        chat = [_user(image, text)]
        prompt = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert prompt == collator.prompt_text(ex) == f"USER: <image>\n{ex.prompt} ASSISTANT:"
        ids = processor(text=[prompt], images=[ex.image], return_tensors="pt")["input_ids"]
        assert torch.equal(ids, collator([ex], train=False)["input_ids"])
        # with the answer: exactly the supervised training sequence (prompt, " answer", </s>)
        answer = {"role": "assistant", "content": [{"type": "text", "text": ex.answer}]}
        full = processor.apply_chat_template([_user(image, text), answer], tokenize=False)
        ids = processor(text=[full], images=[ex.image], return_tensors="pt")["input_ids"]
        assert torch.equal(ids, collator([ex])["input_ids"])


def test_template_handles_text_only_string_content_and_system_turns(shipped):
    _, processor = shipped
    collator = ChatCollator(processor, prompt_format=LEGACY_FORMAT)
    ex = ChatExample("is there a red shape ?", "yes")
    plain = [{"role": "user", "content": ex.prompt}]
    assert processor.apply_chat_template(plain, tokenize=False, add_generation_prompt=True) == (
        collator.prompt_text(ex)
    )
    system = [{"role": "system", "content": "answer briefly"}, *plain]
    rendered = processor.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    assert rendered == "answer briefly USER: is there a red shape ? ASSISTANT:"


def test_pretrain_writes_the_template(tmp_path):
    config = toy.ToyConfig(
        hidden_size=16, intermediate_size=32, num_layers=2, vision_hidden=16, vision_layers=1, image_size=16,
        patch_size=8,
    )  # fmt: skip
    toy.pretrain(tmp_path / "toy", config, steps=1, batch_size=2, eval_examples=1, progress=False)
    assert (tmp_path / "toy" / "chat_template.jinja").read_text() == toy.CHAT_TEMPLATE
    assert load_processor(tmp_path / "toy").chat_template == toy.CHAT_TEMPLATE


def test_pipeline_takes_chat_input_on_a_planned_toy(shipped, examples):
    model, processor = shipped
    with skipvlm.use_plan(model, skipvlm.Plan(skip_attention=[3, 5])):
        pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
        chats = [
            [_user({"type": "image", "image": ex.image}, {"type": "text", "text": ex.prompt})]
            for ex in examples
        ]
        out = pipe(text=chats, max_new_tokens=4, return_full_text=False, generate_kwargs={"do_sample": False})
        batch = ChatCollator(processor)(examples, train=False)
        ids = model.generate(**batch, max_new_tokens=4, do_sample=False)
    expected = processor.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    got = [row[0]["generated_text"] for row in out]
    assert [g.strip() for g in got] == [e.strip() for e in expected]
    assert sum(g.strip() == ex.answer for g, ex in zip(got, examples, strict=True)) >= 2  # the toy can answer
