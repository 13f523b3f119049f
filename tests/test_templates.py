"""Chat templates that are not prefix-preserving: each assistant turn is trained on the prompt serving renders
for it. Two templates written for these tests, each with one property of current model families:
- history rewriting: an assistant turn keeps its reasoning only while it is the last message (Qwen3's template
  drops the reasoning of earlier turns);
- a thinking channel opened by the generation prompt and absent from rendered turns (Gemma 4's template).
Fast: the masks against the rendered inference prompt. Slow: a tiny model trained through the entrypoint on
multi-turn rows answers every turn exactly and stops, from the merged folder."""

from __future__ import annotations

import json

import pytest

from devtools.tiny import build_tokenizer
from tests.helpers import CORPUS, LEARN_ENV, QA, run_train, write_jsonl
from tuneserve import data, tokenizer
from tuneserve.config import load_train_config
from tuneserve.exitcodes import ConfigError

HISTORY_REWRITING = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '\\n' -}}"
    "{%- if m.role == 'assistant' and loop.last and m.reasoning_content -%}"
    "{{- '<think>' + m.reasoning_content + '</think>' -}}"
    "{%- endif -%}"
    "{{- m.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
THINKING_CHANNEL = (
    "{%- for m in messages -%}"
    "{{- '<|turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n' + m.content + '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n<|channel>thought\\n<channel|>' -}}{%- endif -%}"
)
CHANNEL_TOKENS = ["<|turn>", "<turn|>", "<|channel>", "<channel|>"]
REASONING = "think"
# template -> (text, extra special tokens, end of turn, why conversations split, answer as the model must write it)
TEMPLATES = {
    "history-rewriting": (
        HISTORY_REWRITING,
        [],
        "<|im_end|>",
        data.PER_TURN_HISTORY,
        lambda answer: f"<think>{REASONING}</think>{answer}",
    ),
    "thinking-channel": (
        THINKING_CHANNEL,
        CHANNEL_TOKENS,
        "<turn|>",
        data.PER_TURN_GENERATION_PROMPT,
        lambda answer: answer,
    ),
}


def conversations() -> list[dict]:
    """Two exchanges per row, every answer with reasoning; each pair of QA appears once as the second one."""
    rows = []
    for i, (q1, a1) in enumerate(QA):
        q2, a2 = QA[(i + 3) % len(QA)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": q1},
                    {"role": "assistant", "content": a1, "reasoning_content": REASONING},
                    {"role": "user", "content": q2},
                    {"role": "assistant", "content": a2, "reasoning_content": REASONING},
                ]
            }
        )
    return rows


def prepared(tmp_path, name: str):
    template, extra, *_ = TEMPLATES[name]
    tok_dir = tmp_path / f"tok-{name}"
    tok = build_tokenizer(CORPUS, template="chatml", extra_special=extra)
    tok.chat_template = template
    tok.save_pretrained(tok_dir)
    cfg = load_train_config(
        {"BASE_MODEL": str(tok_dir), "DATASET": str(write_jsonl(tmp_path / "d.jsonl", conversations()))}
    )
    shaped = data.load_and_shape(cfg)
    return cfg, shaped, tokenizer.prepare_tokenizer(cfg, needs_template=True)


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_turn_is_trained_after_the_prompt_serving_renders_for_it(tmp_path, name):
    _, _, eot, reason, written = TEMPLATES[name]
    cfg, shaped, info = prepared(tmp_path, name)
    tok = info.tokenizer
    assert info.end_of_turn == eot
    assert data.template_path(tok) == f"one sequence per assistant turn: {reason}"
    for ex in shaped.train:
        sequences, why = data.encode(tok, ex)
        assert why == reason and len(sequences) == 2
        for turn, (ids, labels) in zip((1, 3), sequences):
            prompt = tok.apply_chat_template(ex.messages[:turn], add_generation_prompt=True, tokenize=False)
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            # Masked: exactly the inference prompt; trained: the answer as written there, then the end of turn.
            assert ids[: len(prompt_ids)] == prompt_ids
            assert all(lbl == -100 for lbl in labels[: len(prompt_ids)])
            assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]
            target = tok.decode(ids[len(prompt_ids) :])
            assert target.startswith(written(ex.messages[turn]["content"]) + eot), target
    encoded = data.encode_all(cfg, tok, shaped.train, "train")
    assert encoded.per_turn == {reason: len(QA)} and len(encoded.rows) == 2 * len(QA)


def test_a_prefix_preserving_template_keeps_one_sequence_per_conversation(tmp_path):
    tok_dir = tmp_path / "tok"
    build_tokenizer(CORPUS, template="chatml").save_pretrained(tok_dir)
    cfg = load_train_config(
        {"BASE_MODEL": str(tok_dir), "DATASET": str(write_jsonl(tmp_path / "d.jsonl", conversations()))}
    )
    shaped = data.load_and_shape(cfg)
    tok = tokenizer.prepare_tokenizer(cfg, needs_template=True).tokenizer
    assert data.template_path(tok) == "prefix-preserving: one sequence per conversation"
    sequences, why = data.encode(tok, shaped.train[0])
    assert why is None and len(sequences) == 1


def test_a_template_that_hides_the_answer_is_refused_with_the_reason(tmp_path):
    hiding = (
        "{%- for m in messages -%}{{- '<|im_start|>' + m.role + '\\n' + ('[hidden]' if m.role == 'assistant' "
        "else m.content) + '<|im_end|>\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    tok_dir = tmp_path / "tok"
    tok = build_tokenizer(CORPUS, template="chatml")
    tok.chat_template = hiding
    tok.save_pretrained(tok_dir)
    cfg = load_train_config(
        {"BASE_MODEL": str(tok_dir), "DATASET": str(write_jsonl(tmp_path / "d.jsonl", conversations()))}
    )
    with pytest.raises(ConfigError, match="the assistant's answer cannot be located"):
        tokenizer.prepare_tokenizer(cfg, needs_template=True)
    with pytest.raises(ValueError, match="assistant turn 1 cannot be located"):
        data.encode(tok, data.load_and_shape(cfg).train[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", TEMPLATES)
def test_multi_turn_rows_train_merge_and_answer_every_turn_exactly_with_stops(tmp_path, name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from devtools.tiny import build_tiny_model

    template, extra, eot, reason, written = TEMPLATES[name]
    base = build_tiny_model(tmp_path / "base", CORPUS, template="chatml", chat_template=template, extra_special=extra)
    rows = conversations()
    dataset = tmp_path / "dataset"
    write_jsonl(dataset / "train.jsonl", rows)
    write_jsonl(dataset / "test.jsonl", rows[:2])  # evaluated per turn too (loss and answers)
    out = tmp_path / "out"
    res = run_train(
        {
            "BASE_MODEL": str(base),
            "DATASET": str(dataset),
            "EVAL_SPLIT": "test",
            "OUTPUT_DIR": str(out),
            **LEARN_ENV,
            "NUM_TRAIN_EPOCHS": "100",
            "PER_DEVICE_TRAIN_BATCH_SIZE": str(2 * len(rows)),  # every turn's sequence in each step
        },
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"one sequence per assistant turn: {reason}" in res.stderr
    evaluation = json.loads((out / "verify.json").read_text())["eval"]
    assert evaluation["rows"] == 2 and evaluation["eval_loss"] > 0  # held-out rows scored turn by turn
    stats = json.loads((out / "train_report.json").read_text())["data"]
    assert stats["per_turn_rows"] == {reason: len(rows)} and stats["train_sequences"] == 2 * len(rows)
    merged = out / "merged"
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    gen = GenerationConfig.from_pretrained(merged)
    eot_id = tok.convert_tokens_to_ids(eot)
    assert eot_id in gen.eos_token_id  # the merged folder stops at this template's end of turn
    wrong = []
    for row in rows:
        for turn in (1, 3):
            messages = row["messages"]
            prompt = tok.apply_chat_template(
                messages[:turn], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                ids = model.generate(**prompt, generation_config=gen, max_new_tokens=24)  # greedy: gen's default
            new = ids[0, prompt["input_ids"].shape[1] :].tolist()
            answer = tok.decode(new[:-1])
            if new[-1] != eot_id or answer != written(messages[turn]["content"]):
                wrong.append((messages[turn - 1]["content"], tok.decode(new)))
    assert not wrong, wrong
