"""Prompts are laid out by the model's own chat template, in training and in evaluation alike."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from skipvlm.data import ChatCollator, ChatExample
from skipvlm.data.chat import LEGACY_FORMAT
from skipvlm.data.labels import IGNORE_INDEX
from skipvlm.evaluate import evaluate

from conftest import IMAGE_TOKEN, VISION_END, VISION_START, build_model, toy_parts

QWEN_SPECIAL = [
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
    "<|im_end|>",
]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}question : {{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %} assistant :{% endif %}"
)


class _Qwen2VLProcessor(tf.Qwen2VLProcessor):
    """Qwen2-VL's processor without a video processor (that one needs torchvision)."""

    def check_argument_for_proper_class(self, name, arg):
        return None


def qwen_processor():
    words = ["<pad>", "<s>", "<unk>"] + [f"w{i}" for i in range(IMAGE_TOKEN - 3)]
    words += [*QWEN_SPECIAL, "user", "assistant", "what", "color", "is", "the", "square", "?", "red", "blue"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        padding_side="left",
    )
    fast.add_tokens(
        [tf.AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL], special_tokens=True
    )
    assert fast.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]) == [
        IMAGE_TOKEN,
        VISION_START,
        VISION_END,
    ]
    images = Qwen2VLImageProcessorPil(
        patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=64, max_pixels=64
    )
    return _Qwen2VLProcessor(
        image_processor=images, tokenizer=fast, video_processor=None, chat_template=QWEN_TEMPLATE
    )


def llava_processor():
    processor = toy_parts()[1]
    processor.chat_template = LLAVA_TEMPLATE
    return processor


def example(answer="red"):
    return ChatExample("what color is the square ?", answer, Image.new("RGB", (8, 8), (200, 0, 0)), id="x")


def supervised(batch, tokenizer) -> list[str]:
    ids = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX]
    return tokenizer.convert_ids_to_tokens(ids.tolist())


@pytest.mark.parametrize(
    ("make", "prompt_tokens", "answer_tokens"),
    [
        (
            qwen_processor,
            [
                "<|im_start|>",
                "user",
                "<|vision_start|>",
                *["<|image_pad|>"] * 4,
                "<|vision_end|>",
                "what",
                "color",
            ],
            ["red", "<|im_end|>"],
        ),
        (llava_processor, ["<image>"], ["red", "</s>"]),
    ],
)
def test_each_model_gets_its_own_template_and_supervises_only_the_answer(make, prompt_tokens, answer_tokens):
    processor = make()
    collator = ChatCollator(processor)
    assert "chat template" in collator.template
    batch = collator([example()])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens[: len(prompt_tokens)] == prompt_tokens
    assert supervised(batch, processor.tokenizer) == answer_tokens
    prompt_only = collator([example()], train=False)
    rendered = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "what color is the square ?"}],
            }
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert collator.prompt_text(example()) == rendered
    n = prompt_only["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n], prompt_only["input_ids"][0])


def test_the_two_templates_differ_and_a_custom_format_overrides_them():
    qwen, llava = ChatCollator(qwen_processor()), ChatCollator(llava_processor())
    assert qwen.prompt_text(example()) != llava.prompt_text(example())
    custom = ChatCollator(llava_processor(), prompt_format="user : {image}{prompt} assistant :")
    assert custom.prompt_text(example()) == "user : <image>\nwhat color is the square ? assistant :"
    assert "prompt format" in custom.template


def test_a_processor_without_template_uses_the_legacy_layout(caplog):
    processor = toy_parts()[1]
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    collator = ChatCollator(processor)
    assert collator.prompt_format == LEGACY_FORMAT and "no chat template" in caplog.text
    with pytest.raises(ValueError, match=r"no \{prompt\} field"):
        ChatCollator(processor, prompt_format="USER: {image}")


def test_training_and_evaluation_of_a_tiny_qwen2_vl_use_its_template():
    model = build_model("qwen2_vl")
    collator = ChatCollator(qwen_processor())
    batch = collator([example(), example("blue")])
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)
    seen = []
    original = collator.prompt_text
    collator.prompt_text = lambda ex: seen.append(original(ex)) or original(ex)
    result = evaluate(model, collator, [example()], batch_size=1, max_new_tokens=2)
    assert result.total == 1 and seen and seen[0].startswith("<|im_start|>user ")


def test_the_cli_accepts_a_python_export_and_names_missing_tokenizers(toy_dir, tmp_path, capsys):
    import shutil

    import skipvlm
    from skipvlm.cli import main
    from skipvlm.data import load_processor
    from skipvlm.data.synthetic import SyntheticTask

    base = skipvlm.load_pretrained(toy_dir / "model")  # loaded from a folder: its processor is found there
    eas = skipvlm.get_eas_model(base, skipvlm.EASConfig(skip_attention=[1]))
    collator = ChatCollator(load_processor(toy_dir / "model"))
    eas.calibrate([collator(SyntheticTask().examples(2))], progress=False)
    eas.export_merged(tmp_path / "merged")
    args = ["eval", "--model", str(tmp_path / "merged"), "--data", str(toy_dir / "test.jsonl")]
    assert main([*args, "--max-new-tokens", "2"]) == 0

    bare = tmp_path / "bare"
    shutil.copytree(tmp_path / "merged", bare)
    for f in bare.iterdir():
        if "token" in f.name or "processor" in f.name or f.suffix == ".jinja" or "preprocessor" in f.name:
            f.unlink()
    assert main([*args[:2], str(bare), *args[3:]]) == 2
    assert "holds no tokenizer or processor files" in capsys.readouterr().err


def test_per_example_eval_asks_for_batch_size_one(toy_dir, tmp_path, capsys):
    from skipvlm.cli import main

    args = ["eval", "--model", str(toy_dir / "model"), "--data", str(toy_dir / "test.jsonl")]
    assert main([*args, "--adapters", str(tmp_path), "--merge", "per_example"]) == 2
    assert "--merge per_example re-merges for every example: pass --batch-size 1" in capsys.readouterr().err
