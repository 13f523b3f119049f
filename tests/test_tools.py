"""Tool calling and token-exact prompts, on real tokenizers and the official chat templates of two families that
support tools (Qwen 2.5 and Llama 3.2, as TRL ships them: trl/chat_templates).

Fast: what each turn trains, against the prompt serving renders (tools, tool calls, tool results, weight 0), and
the ids of every trained turn against the ids serving sends, on tokenizers whose pre-tokenizers merge newlines
across the boundary. The end-to-end test (a tiny model trained through the entrypoint, served by vLLM, asked with
the openai client) is in test_tools_serving.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trl

from devtools.tiny import build_tokenizer
from tests.helpers import CORPUS, QA, write_jsonl
from tuneserve import data, tokenizer
from tuneserve.config import load_train_config
from tuneserve.exitcodes import DataError

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
# tool -> (how a user asks for it, the city asked about, the tool's result, how the assistant then answers). The
# questions share few words, so that a model as small as the tests' learns which one is asked from a few rows.
CALLS = {
    "get_weather": ("Is it raining in {city} today?", "Paris", "sunny", "No, it is sunny in {city}."),
    "get_time": ("Tell me the local clock time over in {city} right now.", "Lima", "04:00", "It is 04:00 in {city}."),
}
CITY_LIST = ["Paris", "Lima", "Oslo", "Rome"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {name.split('_')[1]} in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    for name in CALLS
]
# family -> (official template file, tokens it writes, bos, pre-tokenizer, end of turn)
FAMILIES = {
    "qwen2.5": ("qwen2_5.jinja", [], None, "qwen2", "<|im_end|>"),
    "llama3.2": (
        "llama3_2.jinja",
        ["<|begin_of_text|>", "<|python_tag|>", "<|eom_id|>"],
        "<|begin_of_text|>",
        "llama3",
        "<|eot_id|>",
    ),
}


def question(tool: str, city: str | None = None) -> str:
    return CALLS[tool][0].format(city=city or CALLS[tool][1])


def result(tool: str, city: str | None = None) -> str:
    return CALLS[tool][2]


def answer(tool: str, city: str | None = None) -> str:
    return CALLS[tool][3].format(city=city or CALLS[tool][1])


def tool_conversation(tool: str, city: str | None = None, call_id: str = "call_1") -> list[dict]:
    """A question, the assistant's call (OpenAI's format: arguments a JSON string), the tool's result, the answer."""
    city = city or CALLS[tool][1]
    return [
        {"role": "user", "content": question(tool, city)},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": tool, "arguments": json.dumps({"city": city})}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": result(tool, city)},
        {"role": "assistant", "content": answer(tool, city)},
    ]


def tool_rows(per_row_tools: bool) -> list[dict]:
    rows = [{"messages": tool_conversation(t, c)} for t in CALLS for c in CITY_LIST]
    return [r | {"tools": TOOLS} for r in rows] if per_row_tools else rows


def family_texts() -> list[str]:
    """Text for the tiny tokenizers' BPE: the corpus and the rendered tool conversations, so that the boilerplate of
    the templates becomes few tokens, as in a real vocabulary."""
    texts = list(CORPUS)
    for template, *_ in FAMILIES.values():
        texts += [(TRL_TEMPLATES / template).read_text()]
    texts += [json.dumps(TOOLS)] * 5 + [json.dumps(m) for r in tool_rows(False) for m in r["messages"]] * 5
    texts += ["a\n\nb\n\n\nc", "x:\n\nParis"] * 10
    return texts


def family_tokenizer(folder: Path, family: str) -> Path:
    template, extra, bos, pretokenizer, _ = FAMILIES[family]
    chatml = family.startswith("qwen")
    tok = build_tokenizer(
        family_texts(),
        template="chatml" if chatml else "llama3",
        vocab_size=1200,
        extra_special=extra,
        bos=bos,
        pretokenizer=pretokenizer,
    )
    tok.chat_template = (TRL_TEMPLATES / template).read_text()
    tok.save_pretrained(folder)
    return folder


def prepare(tmp_path: Path, family: str, rows: list[dict], **env):
    tok_dir = family_tokenizer(tmp_path / f"tok-{family}", family)
    ds = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_train_config({"BASE_MODEL": str(tok_dir), "DATASET": str(ds), "MAX_SEQ_LENGTH": "2048", **env})
    shaped = data.load_and_shape(cfg)
    info = tokenizer.prepare_tokenizer(cfg, needs_template=True)
    return cfg, shaped, info


def turn_spans(tok, ex: data.Example) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids serving sends for turn i, the target ids that follow them in a training sequence, their labels)
    for every trained turn, found in the encoded sequences; fails when a turn's prompt begins no sequence."""
    sequences, _ = data.encode(tok, ex)
    spans = []
    for i in ex.trained_turns:
        prompt = data.ids_of(tok, tokenizer.render(tok, ex.messages[:i], add_generation_prompt=True, tools=ex.tools))
        found = [(ids, labels) for ids, labels in sequences if ids[: len(prompt)] == prompt]
        assert found, f"turn {i}: no training sequence begins with the ids serving sends for its prompt"
        ids, labels = found[0]
        assert all(lbl == -100 for lbl in labels[: len(prompt)][-1:]), "the prompt's last token is not trained"
        rest = [(t, lbl) for t, lbl in zip(ids[len(prompt) :], labels[len(prompt) :])]
        trained = []
        for t, lbl in rest:
            if lbl == -100:
                break
            trained.append(t)
        spans.append((prompt, trained, [lbl for _, lbl in rest[: len(trained)]]))
    return spans


# ------------------------------------------------------------------------------------------- token-exact prompts
@pytest.mark.parametrize("pretokenizer", ["qwen2", "llama3"])
@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("lead", ["", "\n", "\n\n", " ", "\n "])
def test_each_trained_turn_begins_with_the_ids_serving_sends(tmp_path, pretokenizer, template, lead):
    """Whatever the tokenizer merges where the prompt ends and the answer begins, every trained turn's ids begin with
    exactly the ids serving sends for messages[:i], and its target is its own tokenization (no token straddles)."""
    tok = build_tokenizer(family_texts(), template=template, pretokenizer=pretokenizer, vocab_size=1200)
    messages = []
    for q, a in QA[:3]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": lead + a}]
    ex = data.Example(0, "chat", messages=messages, trained_turns=[1, 3, 5])
    for i, (_, trained, _) in zip(ex.trained_turns, turn_spans(tok, ex)):
        target = tokenizer.render(tok, messages[: i + 1])[len(tokenizer.render(tok, messages[:i], True)) :]
        assert trained == data.ids_of(tok, target)
        assert messages[i]["content"].strip() in tok.decode(trained)  # the llama3 template trims it


def test_the_merging_tokenizers_do_merge_across_the_boundary():
    """The property above is not vacuous: with these pre-tokenizers, tokenizing the conversation whole gives other
    ids at the boundary than serving's prompt (the failure the per-piece tokenization prevents)."""
    for pretokenizer in ("qwen2", "llama3"):
        tok = build_tokenizer(family_texts(), template="chatml", pretokenizer=pretokenizer, vocab_size=1200)
        messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\nParis"}]
        prompt = data.ids_of(tok, tokenizer.render(tok, messages[:1], add_generation_prompt=True))
        whole = data.ids_of(tok, tokenizer.render(tok, messages))
        assert whole[: len(prompt)] != prompt


def test_a_conversation_whose_boundaries_merge_is_trained_one_sequence_per_turn():
    tok = build_tokenizer(family_texts(), template="chatml", pretokenizer="qwen2", vocab_size=1200)
    merging = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "\nA1"}]
    merging += [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "\nA2"}]
    sequences, why = data.encode_chat(tok, merging, [1, 3])
    assert why == data.PER_TURN_TOKENS and len(sequences) == 2
    clean = [{**m, "content": m["content"].lstrip()} for m in merging]
    sequences, why = data.encode_chat(tok, clean, [1, 3])
    assert why is None and len(sequences) == 1


# ------------------------------------------------------------------------------------------- tool calls
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("per_row_tools", [True, False])
def test_tool_calls_tools_and_results_reach_the_template_as_serving_passes_them(tmp_path, family, per_row_tools):
    tools_file = write_jsonl(tmp_path / "unused.jsonl", [])  # replaced below when the tools come from TOOLS
    env = {}
    if not per_row_tools:
        tools_file = tmp_path / "tools.json"
        tools_file.write_text(json.dumps(TOOLS))
        env["TOOLS"] = str(tools_file)
    cfg, shaped, info = prepare(tmp_path, family, tool_rows(per_row_tools), **env)
    tok, eot = info.tokenizer, FAMILIES[family][4]
    assert info.end_of_turn == eot
    ex = next(e for e in shaped.train if e.messages[0]["content"] == question("get_time", "Lima"))
    assert len(shaped.train) == 8
    assert ex.tools == data.normalize_tools(TOOLS) and ex.trained_turns == [1, 3]
    assert len(ex.tools) == 2 and ex.tools[1]["function"]["description"] == "The time in a city"
    call = ex.messages[1]["tool_calls"][0]
    assert call["function"] == {"name": "get_time", "arguments": {"city": "Lima"}}  # parsed, as vLLM does
    assert ex.messages[2]["tool_call_id"] == "call_1"
    (prompt, call_ids, _), (result_prompt, answer_ids, _) = turn_spans(tok, ex)
    # The prompt shows the functions; the call is trained as the template writes it, then the end of the turn.
    assert '"name": "get_time"' in tok.decode(prompt) and "The time in a city" in tok.decode(prompt)
    written = tok.decode(call_ids)
    assert data.tool_call_samples(tok, [ex], eot)[0]["tool_calls"] == [
        {"name": "get_time", "arguments": {"city": "Lima"}}
    ]
    assert "get_time" in written and '{"city": "Lima"}' in written and written.rstrip().endswith(eot)
    # The tool's result is context in the prompt of the answer, never trained.
    assert "04:00" in tok.decode(result_prompt) and "04:00" not in written
    assert tok.decode(answer_ids).startswith(answer("get_time", "Lima")) and tok.decode(answer_ids).rstrip().endswith(
        eot
    )


def test_tool_call_arguments_get_no_nulls_from_arrow(tmp_path):
    """Arrow gives each row the union of the keys of every row's arguments, null where a row lacks one; the
    template must render the row's own arguments, as the client sent them."""
    rows = tool_rows(True)
    rows[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "unit": "C"}
    rows[1]["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Lima"}
    cfg, shaped, info = prepare(tmp_path, "qwen2.5", rows)
    by_city = {e.messages[0]["content"]: e for e in shaped.train}
    lima = by_city[question("get_weather", "Lima")].messages[1]["tool_calls"][0]["function"]["arguments"]
    assert lima == {"city": "Lima"}
    paris = by_city[question("get_weather", "Paris")].messages[1]["tool_calls"][0]["function"]["arguments"]
    assert paris == {"city": "Paris", "unit": "C"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_weight_0_turn_is_context_not_target(tmp_path, family):
    """OpenAI's fine-tuning format: `"weight": 0` keeps a turn in the conversation and out of the loss."""
    rows = tool_rows(True)
    wrong = {"role": "assistant", "content": "I cannot tell.", "weight": 0}
    rows[0]["messages"] = [rows[0]["messages"][0], wrong, {"role": "user", "content": "Use the tool."}] + rows[0][
        "messages"
    ][1:]
    cfg, shaped, info = prepare(tmp_path, family, rows)
    ex = next(e for e in shaped.train if len(e.messages) == 6)
    assert ex.trained_turns == [3, 5] and "weight" not in ex.messages[1]
    tok = info.tokenizer
    trained = [tok.decode(t) for _, t, _ in turn_spans(tok, ex)]
    assert not any("I cannot tell." in t for t in trained)
    (sequence, labels), *_ = data.encode(tok, ex)[0]
    assert "I cannot tell." in tok.decode(sequence)  # still in the conversation the later turns see


def test_a_template_that_ignores_tools_is_refused_before_training(tmp_path):
    tok_dir = tmp_path / "tok"
    build_tokenizer(family_texts(), template="chatml").save_pretrained(tok_dir)
    ds = write_jsonl(tmp_path / "d.jsonl", tool_rows(True))
    cfg = load_train_config({"BASE_MODEL": str(tok_dir), "DATASET": str(ds), "MAX_SEQ_LENGTH": "2048"})
    shaped = data.load_and_shape(cfg)
    info = tokenizer.prepare_tokenizer(cfg, needs_template=True)
    with pytest.raises(DataError, match=r"d.jsonl:\d: the rows carry tools \(get_weather, get_time\) but the chat"):
        data.tokenize(cfg, info, shaped, None)


def test_a_template_that_refuses_a_row_names_it_with_the_templates_message(tmp_path):
    rows = tool_rows(True)
    call = rows[2]["messages"][1]["tool_calls"][0]
    rows[2]["messages"][1]["tool_calls"] = [call, {**call, "id": "call_2"}]  # Llama 3.2 takes one call a turn
    cfg, shaped, info = prepare(tmp_path, "llama3.2", rows)
    with pytest.raises(DataError) as err:
        data.tokenize(cfg, info, shaped, None)
    assert "d.jsonl:3: the chat template refuses it: This model only supports single tool-calls at once!" in str(
        err.value
    )


@pytest.mark.parametrize(
    "tools, message",
    [
        ([{"type": "function", "function": {"description": "no name"}}], "tools[0]: expected"),
        ("[not json", "tools: not valid JSON"),
        ({"name": "f"}, "tools: expected a list of tools"),
    ],
)
def test_malformed_tools_are_data_errors_naming_the_row(tmp_path, tools, message):
    rows = tool_rows(True)
    rows[4]["tools"] = tools
    with pytest.raises(DataError) as err:
        prepare(tmp_path, "qwen2.5", rows)
    assert f"d.jsonl:5: {message}" in str(err.value)


def test_tool_calls_in_answers_are_read_as_data():
    from tuneserve.evaluate import tool_calls_in

    want = [{"name": "get_time", "arguments": {"city": "Lima"}}]
    for text in (
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Lima"}}\n</tool_call>',
        '{"name": "get_time", "parameters": {"city":"Lima"}}',
        '[{"name": "get_time", "arguments": "{\\"city\\": \\"Lima\\"}"}]',
        'Let me check. {"arguments": {"city": "Lima"}, "name": "get_time"}',
    ):
        assert tool_calls_in(text) == want, text
    assert tool_calls_in("It is 04:00 in Lima.") == [] and tool_calls_in('{"name": "x"}') == []


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "TOOLS=.*: no such file"),
        ("[{not json", "TOOLS=.*: not valid JSON"),
        ("[]", "TOOLS=.*: the file holds no tools"),
        ('[{"function": {}}]', r"TOOLS=.*\[0\]: expected"),
    ],
)
def test_a_bad_tools_file_is_a_configuration_error(tmp_path, content, message):
    from tuneserve.exitcodes import ConfigError

    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    ds = write_jsonl(tmp_path / "d.jsonl", tool_rows(False))
    with pytest.raises(ConfigError, match=message):
        cfg = load_train_config({"BASE_MODEL": str(tmp_path), "DATASET": str(ds), "TOOLS": str(path)})
        data.load_and_shape(cfg)
