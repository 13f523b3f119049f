"""Stage: score the held-out rows on the merged model.

- eval loss: mean cross-entropy over the tokens that were in the loss during training (same masks);
- exact match: greedy answer == reference answer (whitespace-trimmed); for a turn that calls tools, the calls
  written in the answer == the reference calls, compared as data (names, and arguments as JSON objects);
- stop rate: answers that ended with a stop id within EVAL_MAX_NEW_TOKENS;
- with EVAL_SQL_EXECUTION: the generated SQL runs on sqlite against the row's schema (the column named by
  EVAL_SQL_CONTEXT_FIELD, or the <SCHEMA>...</SCHEMA> block of the prompt) and returns the reference
  query's rows. The Gemma guide stops at a manual look at a few answers; these are figures.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from tuneserve.data import Example, encode, read_jsonl
from tuneserve.layout import EVAL_ROWS
from tuneserve.memory import input_device
from tuneserve.sqlcheck import execution_match
from tuneserve.verify import load_merged, stop_ids, to_prompt

log = logging.getLogger(__name__)

SCHEMA_RE = re.compile(r"<SCHEMA>\s*(.*?)\s*</SCHEMA>", re.S)


def sql_context(ex: Example, field: str) -> str | None:
    if ex.source and isinstance(ex.source.get(field), str):
        return ex.source[field]
    for m in ex.messages or []:
        found = SCHEMA_RE.search(m["content"])
        if found:
            return found.group(1)
    return None


def tool_calls_in(text: str) -> list[dict]:
    """The tool calls an answer writes as JSON objects with a name and arguments (or Llama's parameters), in order:
    the shape every JSON tool-call format shares (Hermes/Qwen's <tool_call> tags, Llama 3's bare object, Mistral's
    list), read without the serving parser, which the training image lacks. XML or Python-call formats read as no
    calls, and score as misses."""
    calls, decoder, at = [], json.JSONDecoder(), 0
    while (at := text.find("{", at)) != -1:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            at += 1
            continue
        args = value.get("arguments", value.get("parameters")) if isinstance(value, dict) else None
        if isinstance(args, (dict, str)) and isinstance(value.get("name"), str):
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            calls.append({"name": value["name"], "arguments": args})
            at = end
        else:
            at += 1
    return calls


def clean_sql(text: str) -> str:
    """The query in an answer, without a Markdown code fence if the model wrote one."""
    fenced = re.search(r"```(?:sql)?\s*(.*?)```", text, re.S | re.I)
    return (fenced.group(1) if fenced else text).strip()


def evaluate(
    merged: Path,
    data_dir: Path,
    *,
    max_samples: int,
    max_new_tokens: int,
    sql_execution: bool,
    sql_context_field: str,
    batch_size: int = 8,
) -> dict[str, Any] | None:
    import torch
    from tqdm.auto import tqdm

    path = data_dir / EVAL_ROWS
    if not path.is_file():
        log.info("no held-out rows (EVAL_SPLIT/EVAL_SIZE unset): skipping evaluation")
        return None
    examples = read_jsonl(path)[:max_samples]
    tok, model = load_merged(merged)
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for ex in tqdm(examples, desc="eval loss", unit="row"):
            for ids, labels in encode(tok, ex)[0]:  # one sequence, or one per assistant turn
                t = torch.tensor([ids], device=input_device(model))
                lab = torch.tensor([labels], device=input_device(model))
                n = int((lab[:, 1:] != -100).sum())
                if n == 0:
                    continue
                total_loss += float(model(input_ids=t, labels=lab).loss) * n
                total_tokens += n

    prompts = [to_prompt(ex) for ex in examples]
    tok.padding_side = "left"
    stops = set(stop_ids(model))
    answers: list[str] = []
    stopped: list[bool] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="eval generation", unit="batch"):
        chunk = prompts[start : start + batch_size]
        enc = [p.encode(tok) for p in chunk]
        width = max(map(len, enc))
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=input_device(model))
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=input_device(model))
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        answers += [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]
        stopped += [any(int(t) in stops for t in row[width:]) for row in out]

    report = score(
        examples, prompts, answers, stopped, sql_execution=sql_execution, sql_context_field=sql_context_field
    )
    report["eval_loss"] = round(total_loss / total_tokens, 5) if total_tokens else None
    report["perplexity"] = round(math.exp(total_loss / total_tokens), 4) if total_tokens else None
    log.info(
        "evaluation on %d held-out rows: loss %s, exact match %s, stop rate %s%s",
        report["rows"],
        report["eval_loss"],
        report["exact_match"],
        report["stop_rate"],
        f", SQL execution match {report.get('sql_execution_match')}" if sql_execution else "",
    )
    return report


def score(
    examples: list[Example],
    prompts: list,
    answers: list[str],
    stopped: list[bool],
    *,
    sql_execution: bool,
    sql_context_field: str,
) -> dict[str, Any]:
    """The task figures of a list of answers, however they were generated (transformers or vLLM)."""
    rows = []
    exact = runs = matches = sql_rows = 0
    for ex, p, answer, stop in zip(examples, prompts, answers, stopped):
        item: dict[str, Any] = {
            "row": ex.row,
            "reference": p.reference,
            "answer": answer,
            "exact_match": answer == p.reference.strip(),
            "stopped": stop,
        }
        if p.tool_calls is not None:
            item["reference_tool_calls"] = p.tool_calls
            item["tool_calls"] = tool_calls_in(answer)
            item["exact_match"] = item["tool_calls"] == p.tool_calls
        exact += item["exact_match"]
        if sql_execution:
            context = sql_context(ex, sql_context_field)
            if context is not None:
                res = execution_match(clean_sql(answer), p.reference, context)
                item.update(sql_runs=res.runs, sql_matches=res.matches, sql_error=res.error)
                runs += res.runs
                matches += res.matches
                sql_rows += 1
        rows.append(item)
    n = len(rows)
    report: dict[str, Any] = {
        "rows": n,
        "exact_match": round(exact / n, 4) if n else None,
        "stop_rate": round(sum(r["stopped"] for r in rows) / n, 4) if n else None,
    }
    if sql_execution:
        report["sql_rows"] = sql_rows
        report["sql_executes"] = round(runs / sql_rows, 4) if sql_rows else None
        report["sql_execution_match"] = round(matches / sql_rows, 4) if sql_rows else None
    report["answers"] = rows
    return report
