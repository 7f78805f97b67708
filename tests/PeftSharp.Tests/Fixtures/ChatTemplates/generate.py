#!/usr/bin/env python3
"""Writes expected.json: every case of cases.json rendered by Jinja2 under the environment Hugging Face's
apply_chat_template builds (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, HF's tojson,
raise_exception and strftime_now). Run with Debian's python3-jinja2: /usr/bin/python3 generate.py"""
import json, os, sys
from datetime import datetime
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

here = os.path.dirname(os.path.abspath(__file__))

def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = lambda f: datetime.now().strftime(f)

cases = json.load(open(os.path.join(here, "cases.json"), encoding="utf-8"))
conversations = cases["conversations"]
out = {}
for case in cases["cases"]:
    source = case.get("source")
    if source is None:
        source = open(os.path.join(here, case["template"]), encoding="utf-8").read()
    context = dict(case.get("variables", {}))
    context.setdefault("messages", conversations.get(case.get("messages", ""), []))
    context.setdefault("add_generation_prompt", case.get("add_generation_prompt", True))
    context.setdefault("tools", cases["tools"] if case.get("tools") else None)
    context.setdefault("documents", None)
    context.setdefault("bos_token", "<s>")
    context.setdefault("eos_token", "</s>")
    try:
        out[case["name"]] = {"text": env.from_string(source).render(**context)}
    except Exception as e:
        out[case["name"]] = {"error": str(e)}
json.dump(out, open(os.path.join(here, "expected.json"), "w", encoding="utf-8"), ensure_ascii=False, indent=1)
print(len(out), "cases")
