"""Everyday chat requests for draft-head training: how-to, why, comparison, advice, writing, suggestion,
planning and how-it-works questions, each family a few phrasings x many subjects (pure Python).

Like :mod:`jaxinfer.train.prompts`, these are training prompts only. They were written apart from the
acceptance benchmark's prompts (``bench/chat_eval_prompts.json``) and avoid its subjects; a benchmark must
never draw from them.
"""

from __future__ import annotations

import random

# (phrasings, subjects): every phrasing takes every subject of its family
FAMILIES: dict[str, tuple[list[str], list[str]]] = {
    "how_to": (["How do I {x}?", "What is the best way to {x}?", "Can you walk me through how to {x}?",
                "I want to {x}. Where should I start?"],
               ["remove a red wine stain from a carpet", "sharpen a kitchen knife", "change a flat bicycle tire",
                "start running when I have never exercised", "make a simple weekly meal plan",
                "keep basil alive on a windowsill", "back up the photos on my phone", "clean a cast iron pan",
                "choose a ripe watermelon", "fold a fitted sheet", "set up a small home aquarium",
                "save money on groceries", "hang a heavy picture frame", "paint a room without streaks",
                "teach a puppy to sit", "reduce my screen time", "make iced tea at home",
                "organize a cluttered garage", "iron a dress shirt", "grow tomatoes on a balcony",
                "patch a small hole in a wall", "tie a tie", "make my laptop battery last longer",
                "memorize a short speech", "descale an electric kettle", "choose a strong password",
                "stop my glasses from fogging up", "get rid of fruit flies in the kitchen",
                "sew a button back onto a coat", "cook rice so it does not stick", "keep my desk tidy",
                "choose a pair of running shoes", "prepare for a job interview", "write a good resume summary",
                "clean a smartphone screen safely", "make a paper airplane that flies far",
                "store fresh herbs so they last", "learn to juggle three balls", "pack a suitcase for a wedding",
                "repot a houseplant"]),
    "why": (["Why {x}?", "Quick question: why {x}?", "My kid asked me why {x}. What should I tell them?"],
            ["does bread go stale", "does ice float on water", "do onions make people cry when cut",
             "do cats purr", "do leaves change colour in autumn", "is the sea salty", "do we get goosebumps",
             "does metal feel colder than wood in the same room", "do we yawn",
             "do fingers wrinkle in the bath", "does popcorn pop", "do birds migrate in winter",
             "do we have leap years", "does a straw look bent in a glass of water",
             "do mosquitoes bite some people more than others", "does coffee keep people awake",
             "do stars twinkle", "does soda go flat", "do cut apples turn brown", "do we hiccup",
             "does the Moon seem to change shape", "do ears pop on a mountain road",
             "does salt melt ice on roads", "do dogs wag their tails", "do some people sneeze in bright light",
             "does a balloon stick to a wall after rubbing it on hair", "do we dream",
             "does hot food smell stronger than cold food"]),
    "difference": (["What is the difference between {x}?", "How would you explain the difference between {x}?"],
                   ["weather and climate", "a crocodile and an alligator", "baking soda and baking powder",
                    "a hurricane and a tornado", "a lake and a pond", "an ocean and a sea",
                    "a debit card and a credit card", "speed and velocity", "a simile and a metaphor",
                    "a violin and a viola", "a frog and a toad", "memory and storage in a computer",
                    "a latte and a cappuccino", "a moth and a butterfly", "a rabbit and a hare",
                    "an herb and a spice", "a fruit and a vegetable", "a star and a planet",
                    "an atom and a molecule", "renting and buying a home", "a comet and an asteroid",
                    "a dialect and a language", "a psychologist and a psychiatrist", "jogging and sprinting",
                    "a novel and a novella", "a crown and a tiara"]),
    "advice": (["I {x}. Any advice?", "I {x}. What can I do about it?", "Lately I {x}. What would you suggest?"],
               ["can't fall asleep before midnight", "get nervous before speaking in meetings",
                "keep forgetting to drink water", "always have too many browser tabs open",
                "spend too much money on takeaway food", "find it hard to make friends in a new city",
                "keep killing my houseplants", "get bored running on a treadmill",
                "have trouble waking up in the morning", "lose my keys at least once a week",
                "feel sleepy after lunch every day", "want to read more books but never find the time",
                "share a flat with someone who never does the dishes", "hear my neighbour's music late at night",
                "always run out of storage on my phone", "have a bike chain that keeps slipping",
                "get headaches after long days at the computer", "struggle to stick to a budget",
                "feel overwhelmed by my email inbox", "get stiff shoulders from sitting all day"]),
    "writing": (["Write a short note {x}.", "Draft an email {x}.", "Help me write a message {x}."],
                ["to my landlord asking to fix the heating", "to a friend congratulating them on a new job",
                 "to my team announcing a change in the meeting schedule",
                 "to a teacher explaining my child's absence", "to a hotel asking for a late checkout",
                 "to a colleague apologizing for missing a call", "inviting my cousins to a picnic",
                 "declining a wedding invitation politely", "asking my manager for a day off",
                 "welcoming a new member to our book club", "reminding club members that fees are due",
                 "complaining about a late delivery", "asking a shop for a refund on a broken toaster",
                 "to a new neighbour introducing myself", "asking a friend to return a borrowed book"]),
    "suggest": (["Suggest {n} {x}.", "Give me {n} {x}, with a sentence on each."],
                ["activities for a rainy Saturday with kids", "healthy snacks to bring to work",
                 "board games for four players", "gifts for someone who loves cooking",
                 "easy dinners that take under twenty minutes", "ways to use leftover rice",
                 "team-building activities for a small office", "songs for a long car journey",
                 "ways to make a small apartment feel bigger", "hobbies that cost very little",
                 "things to do in a city on a rainy day", "icebreaker questions for a workshop",
                 "ways to reuse glass jars", "indoor plants that need little light",
                 "topics for a school science fair project", "stretches to do at a desk"]),
    "plan": (["Make me a plan for {x}.", "Sketch out {x} for me, step by step."],
             ["a two-week study schedule for a driving theory test", "a weekly cleaning routine for a shared flat",
              "a one-week beginner workout routine", "a day trip to the seaside on a small budget",
              "a simple morning routine", "a family movie night", "saving for a new bicycle over six months",
              "a picnic lunch for eight people", "a reading list for a summer holiday",
              "a first museum visit with two young children", "a weekend spent decluttering a bedroom"]),
    "how_works": (["How does {x} work?", "Explain how {x} works in plain language."],
                  ["a microwave oven", "a thermostat", "GPS navigation", "a credit score",
                   "noise-cancelling headphones", "a touchscreen", "a solar panel", "the gears on a bicycle",
                   "a dishwasher", "Wi-Fi", "a pin tumbler lock", "a barcode scanner", "an elevator",
                   "a hydroelectric dam", "a pressure cooker", "a smoke detector", "a compass",
                   "a sewing machine", "a camera lens", "a recycling sorting plant", "an electric toothbrush",
                   "a vending machine"]),
}


def _fill(phrasing: str, subject: str, rng: random.Random) -> str:
    text = phrasing.format(x=subject, n=rng.choice(["three", "four", "five"]))
    return text[0].upper() + text[1:]


def everyday_pool(subjects: dict[str, list[str]] | None = None, seed: int = 0) -> list[str]:
    """Every phrasing x subject prompt of the families (``subjects``: a subset per family, default all)."""
    rng = random.Random(seed)
    out = []
    for name, (phrasings, all_subjects) in FAMILIES.items():
        for s in (all_subjects if subjects is None else subjects.get(name, [])):
            out += [_fill(p, s, rng) for p in phrasings]
    return out


def split_everyday(held_fraction: float, avoid: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """``(training prompts, held-out prompts)`` with whole subjects held out (about ``held_fraction`` of each
    family's, every phrasing of a subject on one side); subjects mentioning a word of ``avoid`` (the held-out
    topics of :func:`~jaxinfer.train.prompts.split_topics`) are held out too."""
    rng = random.Random(seed + 2)
    train, held = {}, {}
    for name, (_, subjects) in FAMILIES.items():
        order = list(subjects)
        rng.shuffle(order)
        k = max(1, round(held_fraction * len(order)))
        held[name] = order[:k] + [s for s in order[k:] if any(a.lower() in s.lower() for a in avoid)]
        train[name] = [s for s in order[k:] if s not in held[name]]
    return everyday_pool(train, seed), everyday_pool(held, seed)
