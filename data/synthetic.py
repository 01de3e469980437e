"""Synthetic task world shared by the tiny model's corpus and the preference data.

Every task is a short question with one checkable answer: two-digit addition and subtraction,
multiplication by one digit, word problems, "which is larger", "reverse the word", "what comes next".
A problem renders three ways: a bare answer, a worked explanation ending "So the answer is X.",
and a chat reply. `solve` and `final_answer` re-derive and extract answers from text, so anyone
can check that a preference pair's chosen completion is right and its rejected one is wrong.

About 10% of questions (by a stable hash of the question) are reserved for the eval split: they
never appear in the model's corpus nor in the train preferences.
"""

import hashlib
import re
from dataclasses import dataclass, field

WORDS = """apple river stone cloud green light table chair water bread house mouse horse paper garden
window silver orange purple yellow little winter summer spring autumn forest candle button
pencil basket bottle rabbit turtle monkey tiger zebra lemon melon grape cherry peach plum carrot
potato tomato onion pepper salt sugar honey butter cheese milk coffee tea juice cookie pizza
planet rocket comet moon star sun storm rain snow wind shadow mirror ladder bridge castle tower
island ocean desert valley hill field farm barn shell pearl coin ring crown sword shield arrow
drum flute piano guitar violin song dance story dream smile laugh heart brain hand foot nose
mouth tooth hair finger school teacher student book letter number circle square line point
market street city village road train plane boat ship truck wheel engine motor robot camera
clock watch phone radio music color friend family mother father sister brother baby child""".split()  # noqa: SIM905

NAMES = """Mia Tom Ana Leo Sara Ben Lily Max Nora Sam
Emma Jack Zoe Omar Ivy Noah Ella Finn Ruby Hugo""".split()  # noqa: SIM905

ITEMS = """apples pencils books coins stamps marbles cards shells stickers cookies eggs flowers balloons
candles buttons rocks cups toys plums beads""".split()  # noqa: SIM905

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a careful math tutor.",
    "Answer briefly and correctly.",
    "You are a friendly teacher.",
]

# How often each kind of problem is drawn.
ARITH_KINDS = {"add": 0.40, "sub": 0.20, "mul": 0.15, "story": 0.25}
WORD_KINDS = {"compare": 0.40, "reverse": 0.30, "next": 0.30}
ALL_KINDS = {
    "add": 0.26,
    "sub": 0.13,
    "mul": 0.10,
    "story": 0.16,
    "compare": 0.14,
    "reverse": 0.10,
    "next": 0.11,
}


@dataclass
class Problem:
    kind: str
    key: str  # identity of the question; same question -> same key
    question: str
    answer: str
    worked_body: str  # explanation up to, not including, "So the answer is X."
    chat_fmt: str  # chat reply with "{ans}" where the answer goes
    wrong_near: list = field(default_factory=list)  # wrong answers differing in <= 2 tokens
    wrong_far: list = field(default_factory=list)  # other plausible wrong answers

    def worked(self, ans=None):
        return f"{self.worked_body} So the answer is {self.answer if ans is None else ans}."

    def chat(self, ans=None):
        return self.chat_fmt.replace("{ans}", self.answer if ans is None else ans)


def is_eval_key(key):
    """Stable ~10% split of the question space reserved for eval."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10 == 0


def _hamming_le2(a, b):
    return len(a) == len(b) and a != b and sum(x != y for x, y in zip(a, b)) <= 2


def _numeric_wrongs(c, extra=()):
    """Wrong answers for a correct integer c: near (same length, 1-2 digits differ) and far."""
    s = str(c)
    cands = [c + 1, c - 1, c + 10, c - 10, *extra]
    if len(s) == 2 and s[0] != s[1]:
        cands.append(int(s[::-1]))
    near, far = [], []
    for w in cands:
        ws = str(w)
        if w < 0 or ws == s or ws in near:
            continue
        (near if _hamming_le2(ws, s) else far).append(ws)
    for d in (11, 13, 17, 19, 21):
        for w in (c + d, c - d):
            if w >= 0 and str(w) not in far and str(w) not in near:
                far.append(str(w))
    return near, far


def make_add(a, b):
    c = a + b
    oa, ob, ta, tb = a % 10, b % 10, a // 10, b // 10
    ones = oa + ob
    carry = ones // 10
    body = f"Add the ones: {oa} + {ob} = {ones}."
    if carry:
        body += f" Write {ones % 10}, carry 1."
    body += f" Add the tens: {ta} + {tb}" + (" + 1" if carry else "") + f" = {ta + tb + carry}."
    extra = [c - 10] if carry else [c + 10]  # forgot (or invented) the carry
    near, far = _numeric_wrongs(c, extra)
    return Problem(
        "add", f"add:{a}:{b}", f"What is {a} + {b}?", str(c), body, f"{a} + {b} = {{ans}}.", near, far
    )


def make_sub(a, b):
    c = a - b
    body = f"Check by adding: {b} + {c} = {a}."
    near, far = _numeric_wrongs(c, [b - a + 2 * c] if c > 0 else [])
    return Problem(
        "sub", f"sub:{a}:{b}", f"What is {a} - {b}?", str(c), body, f"{a} - {b} = {{ans}}.", near, far
    )


def make_mul(a, b):
    c = a * b
    t, o = a - a % 10, a % 10
    body = f"Split {a} into {t} + {o}: {t} * {b} = {t * b} and {o} * {b} = {o * b}. {t * b} + {o * b} = {c}."
    near, far = _numeric_wrongs(c, [c + b, c - b, t * b + o])
    return Problem(
        "mul", f"mul:{a}:{b}", f"What is {a} * {b}?", str(c), body, f"{a} * {b} = {{ans}}.", near, far
    )


def make_story(name, item, a, b, gets):
    if gets:
        c = a + b
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        body = f"{name} starts with {a} and gets {b} more: {a} + {b} = {c}."
        chat = f"{name} has {{ans}} {item} now."
    else:
        c = a - b
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        body = f"{name} starts with {a} and gives away {b}: {a} - {b} = {c}."
        chat = f"{{ans}} {item} are left."
    near, far = _numeric_wrongs(c, [a - b if gets else a + b])
    key = f"story:{'get' if gets else 'give'}:{name}:{item}:{a}:{b}"
    return Problem("story", key, q, str(c), body, chat, near, far)


def make_compare(a, b):
    hi, lo = max(a, b), min(a, b)
    if a // 10 != b // 10:
        body = f"The tens digits are {a // 10} and {b // 10}, and {hi // 10} is bigger."
    else:
        body = f"The tens digits are equal, and the ones digits are {a % 10} and {b % 10}."
    # The smaller number is the natural wrong answer; it is "near" when 1-2 digits differ.
    near, far = ([str(lo)], []) if _hamming_le2(str(lo), str(hi)) else ([], [str(lo)])
    return Problem(
        "compare",
        f"compare:{a}:{b}",
        f"Which is larger, {a} or {b}?",
        str(hi),
        body,
        "{ans} is larger.",
        near,
        far,
    )


def make_reverse(word):
    r = word[::-1]
    letters = ", ".join(word)
    body = f"The letters are {letters}. Backwards they are {', '.join(r)}."
    far = [word] if word != r else []
    for i in range(len(r) - 1):  # two adjacent letters swapped
        s = r[:i] + r[i + 1] + r[i] + r[i + 2 :]
        if s != r and s not in far:
            far.append(s)
    return Problem(
        "reverse",
        f"reverse:{word}",
        f'Reverse the word "{word}".',
        r,
        body,
        f'The word "{word}" backwards is "{{ans}}".',
        [],
        far,
    )


def make_next(n):
    c = n + 1
    near, far = _numeric_wrongs(c, [n - 1, n + 2])
    return Problem(
        "next",
        f"next:{n}",
        f"What number comes after {n}?",
        str(c),
        f"{n} + 1 = {c}.",
        f"The number after {n} is {{ans}}.",
        near,
        far,
    )


def _draw(rng, kind):
    if kind == "add":
        return make_add(rng.randint(10, 99), rng.randint(10, 99))
    if kind == "sub":
        a = rng.randint(20, 99)
        return make_sub(a, rng.randint(10, a))
    if kind == "mul":
        return make_mul(rng.randint(11, 49), rng.randint(2, 9))
    if kind == "story":
        gets = rng.random() < 0.6
        a = rng.randint(10, 60)
        b = rng.randint(2, 39) if gets else rng.randint(2, a - 1)
        return make_story(rng.choice(NAMES), rng.choice(ITEMS), a, b, gets)
    if kind == "compare":
        a, b = rng.sample(range(10, 100), 2)
        return make_compare(a, b)
    if kind == "reverse":
        return make_reverse(rng.choice(WORDS))
    if kind == "next":
        return make_next(rng.randint(1, 998))
    raise ValueError(kind)


def draw_problem(rng, kinds=ALL_KINDS, split="train"):
    """A random problem whose question belongs to `split` ("train" or "eval")."""
    names, weights = list(kinds), list(kinds.values())
    while True:
        p = _draw(rng, rng.choices(names, weights)[0])
        if is_eval_key(p.key) == (split == "eval"):
            return p


# ---- text forms -------------------------------------------------------------------------------


def plain_prompt(question):
    """Explicit-format prompt; completions start with a space (" 85", " Add the ones: ...")."""
    return f"Question: {question}\nAnswer:"


def chat_messages(question, rng=None, system_rate=0.3):
    msgs = [{"role": "user", "content": question}]
    if rng is not None and rng.random() < system_rate:
        msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return msgs


def corpus_document(rng, render_chat):
    """One pre-training document (correct answers only) from the train part of the question space.

    render_chat(messages) -> str renders a conversation with the tokenizer's chat template.
    """
    p = draw_problem(rng)
    style = rng.random()
    if style < 0.45:
        return plain_prompt(p.question) + " " + p.answer
    if style < 0.65:
        return plain_prompt(p.question) + " " + p.worked()
    reply = p.chat() if style < 0.90 else p.worked()
    return render_chat(chat_messages(p.question, rng) + [{"role": "assistant", "content": reply}])


# ---- checking ---------------------------------------------------------------------------------

_QUESTION_PATTERNS = [
    (r"What is (\d+) \+ (\d+)\?", lambda m: make_add(int(m[1]), int(m[2]))),
    (r"What is (\d+) - (\d+)\?", lambda m: make_sub(int(m[1]), int(m[2]))),
    (r"What is (\d+) \* (\d+)\?", lambda m: make_mul(int(m[1]), int(m[2]))),
    (
        r"(\w+) has (\d+) (\w+) and gets (\d+) more\. How many \w+ does \w+ have now\?",
        lambda m: make_story(m[1], m[3], int(m[2]), int(m[4]), True),
    ),
    (
        r"(\w+) has (\d+) (\w+) and gives away (\d+)\. How many \w+ are left\?",
        lambda m: make_story(m[1], m[3], int(m[2]), int(m[4]), False),
    ),
    (r"Which is larger, (\d+) or (\d+)\?", lambda m: make_compare(int(m[1]), int(m[2]))),
    (r'Reverse the word "(\w+)"\.', lambda m: make_reverse(m[1])),
    (r"What number comes after (\d+)\?", lambda m: make_next(int(m[1]))),
]


def parse(question):
    """The Problem a question text asks (re-derived from the text alone), or None."""
    for pat, make in _QUESTION_PATTERNS:
        m = re.fullmatch(pat, question)
        if m:
            return make(m)
    return None


def solve(question):
    """The correct answer (a string) to a question text, or None if it is not one of ours."""
    p = parse(question)
    return p.answer if p else None


def question_of(prompt):
    """The question inside an explicit prompt string or a message list."""
    if isinstance(prompt, list):
        return [m["content"] for m in prompt if m["role"] == "user"][-1]
    m = re.match(r"^Question: (.*)\nAnswer:$", prompt, re.DOTALL)
    return m[1] if m else None


def final_answer(question, completion):
    """The answer a completion gives (string or the content of a one-message list)."""
    if isinstance(completion, list):
        completion = completion[-1]["content"]
    text = completion.strip()
    m = re.search(r"So the answer is (\S+)\.$", text)
    if m:
        return m[1]
    if question.startswith("Reverse"):
        quoted = re.findall(r'"(\w+)"', text)
        return quoted[-1] if quoted else text
    nums = re.findall(r"\d+", text)
    return nums[-1] if nums else text
