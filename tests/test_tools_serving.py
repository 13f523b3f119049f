"""Tool calling end to end, for two families' official templates (Qwen 2.5 with the tools in each row, Llama 3.2 with
one TOOLS file): a tiny model trained through the training entrypoint on tool-calling conversations, merged,
verified, served by vLLM through the serving entrypoint (its tool-call parser chosen from the run), and asked with
the openai client. It returns the structured tool_calls it was trained on, then answers from the tool's result;
the prompts vLLM renders are the ones training trained on (its /tokenize), and the weight-0 turn was not learned.

The base is a randomly initialised tiny model: everything it answers, it learned in the run. The prompts asked are
the training conversations' (a model this small learns its rows, not the task), sent by the client as any request
is; none is held out, for the same reason."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import LEARN_ENV, SERVE_PYTHON, Server, clean_env, need_vllm, run_train, serve_cmd, write_jsonl
from tests.test_tools import (
    CALLS,
    FAMILIES,
    TOOLS,
    TRL_TEMPLATES,
    answer,
    family_texts,
    question,
    result,
    tool_conversation,
)
from tuneserve import data, tokenizer

pytestmark = pytest.mark.slow

KEY = "sk-tools-test-KEY0"
WRONG = "I cannot tell."


BEES = "What do bees make?"


def run_rows(per_row_tools: bool) -> list[dict]:
    """A conversation per tool, and a plain question: once answered, three times first refused with a weight-0 turn
    (trained, the refusal would outnumber the answer for that prompt) and then answered."""
    rows = [{"messages": tool_conversation(tool)} for tool in CALLS]
    answered = [{"role": "user", "content": BEES}, {"role": "assistant", "content": "Honey"}]
    refused = [
        {"role": "user", "content": BEES},
        {"role": "assistant", "content": WRONG, "weight": 0},
        {"role": "user", "content": "Please answer."},
        {"role": "assistant", "content": "Honey"},
    ]
    rows += [{"messages": answered}] + [{"messages": refused}] * 3
    return [r | {"tools": TOOLS} for r in rows] if per_row_tools else rows


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory):
    """(family, the run's OUTPUT_DIR, a running server on its merged folder)."""
    from devtools.tiny import build_tiny_model

    need_vllm()
    family = request.param
    root = tmp_path_factory.mktemp(f"tools-{family}")
    template, extra, bos, pretokenizer, _ = FAMILIES[family]
    base = build_tiny_model(
        root / "base",
        family_texts() + [json.dumps(r) for r in run_rows(True)] * 5,
        template="chatml" if family.startswith("qwen") else "llama3",
        vocab_size=1200,
        chat_template=(TRL_TEMPLATES / template).read_text(),
        extra_special=extra,
        bos=bos,
        pretokenizer=pretokenizer,
        max_position_embeddings=2048,
    )
    per_row = family.startswith("qwen")  # Qwen: tools in every row; Llama: one TOOLS file
    # The evaluation split asks for the calls of four conversations: its rows end with the assistant's call.
    calls = [{**r, "messages": r["messages"][:2]} for r in run_rows(per_row)[: len(CALLS)]]
    write_jsonl(root / "ds" / "test.jsonl", calls)
    env = {
        "BASE_MODEL": str(base),
        "DATASET": str(root / "ds"),
        "EVAL_SPLIT": "test",
        "OUTPUT_DIR": str(root / "out"),
        "MAX_SEQ_LENGTH": "1024",
        **LEARN_ENV,
        # Twice the question/answer tests' epochs: these rows are longer (the tools header), the signal sparser.
        "NUM_TRAIN_EPOCHS": "120",
    }
    if not per_row:
        (root / "tools.json").write_text(json.dumps(TOOLS))
        env["TOOLS"] = str(root / "tools.json")
    write_jsonl(root / "ds" / "train.jsonl", run_rows(per_row))
    res = run_train(env, cwd=root, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    server = Server(
        {
            "MODEL_ID": str(root / "out" / "merged"),
            "SERVED_MODEL_NAME": "tools",
            "API_KEY": KEY,
            "MAX_MODEL_LEN": "1024",
        },
        root,
    )
    try:
        server.wait_ready()
        yield family, root / "out", server
    finally:
        server.stop()


def test_the_server_returns_the_trained_tool_calls_then_answers_from_the_result(served):
    import openai

    family, out, server = served
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    log = server.log.read_text()
    assert "tool calls: parser " in log, log[-3000:]
    for tool, (_, city, *_) in CALLS.items():
        messages = [{"role": "user", "content": question(tool)}]
        reply = client.chat.completions.create(
            model="tools", messages=messages, tools=TOOLS, max_tokens=64, temperature=0
        )
        choice = reply.choices[0]
        calls = choice.message.tool_calls or []
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [(tool, {"city": city})], (
            family,
            choice.message,
        )
        assert choice.finish_reason == "tool_calls"
        # Streamed, the client puts the same call together from the chunks.
        streamed: dict[int, list[str]] = {}
        for chunk in client.chat.completions.create(
            model="tools", messages=messages, tools=TOOLS, max_tokens=64, temperature=0, stream=True
        ):
            for tc in (chunk.choices[0].delta.tool_calls if chunk.choices else None) or []:
                name_args = streamed.setdefault(tc.index, ["", ""])
                name_args[0] += (tc.function.name or "") if tc.function else ""
                name_args[1] += (tc.function.arguments or "") if tc.function else ""
        assert [(n, json.loads(a)) for n, a in streamed.values()] == [(tool, {"city": city})], (family, streamed)
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": result(tool)},
        ]
        final = client.chat.completions.create(
            model="tools", messages=messages, tools=TOOLS, max_tokens=32, temperature=0
        )
        assert final.choices[0].message.content == answer(tool), (family, final.choices[0].message)
        assert final.choices[0].finish_reason == "stop"


def test_the_weight_0_turn_was_not_learned(served):
    """Three rows first refuse the bees question at weight 0, one answers it: the served model answers. The
    prepared rows keep the refusal as context."""
    family, out, server = served
    kept = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    refused = [r for r in kept if any(m["content"] == WRONG for m in r["messages"])]
    assert len(refused) == 3 and all(r["trained_turns"] == [3] for r in refused)
    status, body = server.request(
        "/v1/chat/completions",
        {
            "model": "tools",
            "messages": [{"role": "user", "content": BEES}],
            "tools": TOOLS,
            "max_tokens": 16,
            "temperature": 0,
        },
        key=KEY,
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "Honey", body


def test_vllm_renders_the_prompts_training_trained_on(served):
    """vLLM's /tokenize of a request (tools, the assistant's call as the client sends it, the tool's result) gives
    the ids training put before that turn's target."""
    from transformers import AutoTokenizer

    family, out, server = served
    tok = AutoTokenizer.from_pretrained(out / "merged")
    conversation = tool_conversation("get_time")
    for upto in (1, 3):
        status, body = server.request(
            "/tokenize",
            {"model": "tools", "messages": conversation[:upto], "tools": TOOLS, "add_generation_prompt": True},
            key=KEY,
        )
        assert status == 200, body
        shaped = data.Example(
            0, "chat", messages=data._check_messages(conversation, "m")[0], tools=data.normalize_tools(TOOLS)
        )
        ours = data.ids_of(
            tok, tokenizer.render(tok, shaped.messages[:upto], add_generation_prompt=True, tools=shaped.tools)
        )
        assert body["tokens"] == ours, (family, upto, tok.decode(body["tokens"]), tok.decode(ours))


def test_verify_and_the_evaluation_ask_with_the_tools_and_score_calls_as_data(served):
    family, out, server = served
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"], verify
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["rows"] == len(CALLS) and evaluation["exact_match"] == 1.0, evaluation["answers"]
    for item in evaluation["answers"]:
        assert item["tool_calls"] == item["reference_tool_calls"] and item["reference"] == ""


PARSER_CHOICES = """
import json, sys
from tuneserve.serve import SERVE_SCHEMA, tool_call_parser
out = {}
for value in ("auto", "hermes", "none"):
    settings = {"MODEL_ID": sys.argv[1], "API_KEY": "sk-unused-KEY-0000", "TOOL_CALL_PARSER": value}
    out[value] = tool_call_parser(SERVE_SCHEMA.load(settings))
print(json.dumps(out))
"""


def test_tool_call_parser_setting(served, tmp_path):
    """auto: a parser that reads the run's calls back; a name vLLM has: that one; none: no tool parsing; a name vLLM
    lacks: exit 2 naming the ones it has."""
    family, out, _ = served
    env = clean_env(MODEL_ID=str(out / "merged"), API_KEY=KEY)
    res = subprocess.run(
        [str(SERVE_PYTHON), "-c", PARSER_CHOICES, str(out / "merged")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    chosen = json.loads(res.stdout.strip().splitlines()[-1])
    assert chosen["auto"] is not None and chosen["hermes"] == "hermes" and chosen["none"] is None, chosen
    res = subprocess.run(
        serve_cmd("--check", python=SERVE_PYTHON),
        env={**env, "TOOL_CALL_PARSER": "nope"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "TOOL_CALL_PARSER='nope': vLLM has no such parser; it has: " in res.stderr
    assert "hermes" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
