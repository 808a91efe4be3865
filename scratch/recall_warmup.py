"""Scratch: the warm-up with a recalled fact before the chosen option ("The capital of Egypt is Cairo. The answer is
C: Cairo."), on the everyday-knowledge templates of branch reachable-task (worktree /work/bench19/tree)."""
import re, sys
from pathlib import Path
sys.path.insert(0, "/work/bench19/tree/src")
import demopsd.training.warmup as W
from demopsd.data.types import option_texts

def statement(question, text):
    if m := re.fullmatch(r"What is the capital of (.+)\?", question):
        return f"The capital of {m[1]} is {text}."
    if m := re.fullmatch(r"What colour is (.+)\?", question):
        return f"{m[1][0].upper() + m[1][1:]} is {text}."
    if m := re.fullmatch(r"Which animal says '(.+)'\?", question):
        return f"A {text} says '{m[1]}'."
    if m := re.fullmatch(r"Which word means the opposite of '(.+)'\?", question):
        return f"The opposite of '{m[1]}' is '{text}'."
    if question == "Which word comes first in alphabetical order?":
        return f"'{text}' comes first in alphabetical order."
    if m := re.fullmatch(r"Which (?:animal|of these) is an? (.+)\?", question):
        return f"A {text} is a {m[1]}."
    return ""  # uninferable: nothing to recall

def recall_answer(example):
    text = option_texts(example.prompt)[example.answer]
    said = statement(example.prompt.split("\n")[0], text)
    said = f"{said} " if said else ""
    return (f"<reasoning>\n{said}The answer is {example.answer}: {text}.\n</reasoning>\n"
            f"<answer>\n{example.answer}\n</answer>")

W.well_formed_answer = recall_answer
kind = sys.argv[2] if len(sys.argv) > 2 else "mixed"
print(recall_answer(W.warmup_questions(W.WarmupConfig(kind=kind))[0]))
W.warm_up(Path(sys.argv[1]), W.WarmupConfig(kind=kind, lr=float(sys.argv[3]) if len(sys.argv) > 3 else 3e-5))
