"""A varied chat prompt set for draft-head training: instruction templates x topics, everyday requests
(:mod:`jaxinfer.train.everyday`), plus arithmetic and rewriting tasks with generated content (pure Python,
deterministic for a seed).

These templates and topics are for training only; an acceptance benchmark must use prompts written
separately (other templates and topics), never these.
"""

from __future__ import annotations

import random

TEMPLATES = [
    "Explain {t} to a ten-year-old.",
    "Give me three interesting facts about {t}.",
    "Write a short poem about {t}.",
    "What are the pros and cons of {t}?",
    "Write a brief story in which {t} plays an important role.",
    "Summarize the history of {t} in a few sentences.",
    "How would you describe {t} to someone who has never heard of it?",
    "List five common misconceptions about {t}.",
    "Write a friendly email to a colleague recommending they learn about {t}.",
    "What questions would an expert on {t} ask a beginner?",
    "Give step-by-step advice for someone getting started with {t}.",
    "Compare {t} with something similar and explain the differences.",
    "Write a haiku about {t}.",
    "Why do people find {t} fascinating?",
    "Describe a typical day for someone who works with {t}.",
    "What is the future of {t} likely to look like?",
    "Write a short dialogue between two friends discussing {t}.",
    "Create a quiz with three questions about {t}, with answers.",
    "Give me a one-paragraph introduction to {t}.",
    "What are the most important things to know about {t}?",
    "Write a product description for a book about {t}.",
    "Tell me a fun fact about {t} and explain why it is true.",
    "Write a limerick about {t}.",
    "Outline a short lesson plan for teaching {t}.",
    "What are the ethical questions surrounding {t}?",
    "Describe {t} using only simple words.",
]

TOPICS = [
    "photosynthesis", "the Roman Empire", "black holes", "honeybees", "the stock market", "volcanoes",
    "machine learning", "the water cycle", "ancient Egypt", "climate change", "the human heart", "jazz music",
    "electric cars", "the printing press", "coral reefs", "chess", "vaccines", "the Moon landing",
    "renewable energy", "origami", "the Great Wall of China", "dinosaurs", "recycling", "the internet",
    "gardening", "the Olympic Games", "earthquakes", "coffee", "the French Revolution", "sleep",
    "rainforests", "bicycles", "the periodic table", "penguins", "cryptography", "baking bread",
    "the solar system", "democracy", "musical instruments", "glaciers", "public libraries", "robots",
    "meditation", "the Silk Road", "wind turbines", "octopuses", "chocolate", "the Renaissance",
    "volunteering", "thunderstorms", "the immune system", "trains", "mountains", "pizza", "the ocean tides",
    "Shakespeare", "smartphones", "mushrooms", "budgeting", "bridges", "owls", "the Amazon river",
    "video games", "tea", "fireworks", "the Arctic", "yoga", "the Eiffel Tower", "dolphins", "soap",
]

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]
ITEMS = ["apples", "pencils", "books", "marbles", "cookies", "stamps", "tickets", "shells"]
SENTENCES = [
    "the meeting was moved to thursday because the room was booked",
    "our team finished the project early and celebrated with a picnic",
    "the weather was cold but the children played outside all afternoon",
    "she forgot her umbrella so she waited under the bridge until the rain stopped",
    "the new library opens at nine and closes at six on weekdays",
    "he practiced the piano every evening before the concert",
]


def _arithmetic(rng: random.Random) -> str:
    a, b, c = rng.randint(3, 60), rng.randint(2, 25), rng.randint(2, 9)
    name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    return rng.choice([
        f"{name} has {a} {item} and gives {b} to {other}. How many {item} does {name} have left? Explain.",
        f"A box holds {c} {item}. How many {item} are in {a} boxes? Show your work.",
        f"What is {a} times {b}, plus {c}? Explain each step.",
        f"{name} reads {b} pages a day. How many days to finish a {a * b}-page book?",
    ])


def _rewrite(rng: random.Random) -> str:
    s = rng.choice(SENTENCES)
    return rng.choice([
        f"Fix the capitalization and punctuation of this sentence: {s}",
        f"Rewrite this sentence in a more formal tone: {s}",
        f"Translate this sentence into French: {s}",
        f"Turn this sentence into a question: {s}",
    ])


def prompt_set(n: int, seed: int = 0, topics: list[str] | None = None,
               everyday: list[str] | None = None) -> list[str]:
    """``n`` distinct user prompts: about 6% arithmetic, 6% rewriting, 40% everyday requests (while the pool
    lasts) and the rest template x topic.

    Args:
      n: how many (at most the number of distinct prompts the pools allow).
      seed: selection seed.
      topics: the topic pool (default :data:`TOPICS`); split it to hold out whole topics.
      everyday: the everyday request pool (default none; see :mod:`jaxinfer.train.everyday`).
    """
    topics = TOPICS if topics is None else topics
    rng = random.Random(seed)
    topical = [t.format(t=topic) for t in TEMPLATES for topic in topics]
    daily = list(everyday or [])
    rng.shuffle(topical)
    rng.shuffle(daily)
    limit = len(topical) + len(daily)
    if n > limit:
        raise ValueError(f"asked for {n} prompts; the templates, topics and everyday requests give {limit} at most")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        u = rng.random()
        if u < 0.06:
            p = _arithmetic(rng)
        elif u < 0.12:
            p = _rewrite(rng)
        elif u < 0.52 and daily or not topical:
            p = daily.pop()
        else:
            p = topical.pop()
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def split_topics(num_held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(training topics, held-out topics)``: the held-out prompts use topics training never saw."""
    rng = random.Random(seed + 1)
    topics = list(TOPICS)
    rng.shuffle(topics)
    return topics[num_held_out:], topics[:num_held_out]
