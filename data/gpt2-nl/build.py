"""Writes the gpt2-nl CPU twin's Dutch data (stdlib only, deterministic): `python data/gpt2-nl/build.py`.

A small language-adaptation task in the spirit of gpt2-nl (continued pretraining in Dutch → SFT → DPO):
  corpus.jsonl / corpus_heldout.jsonl   Dutch paragraphs for CPT (held-out paragraphs are about other places)
  sft.jsonl                             Dutch questions with Dutch answers
  preference.jsonl / preference_heldout.jsonl
                                        Dutch question; chosen = Dutch answer, rejected = the same answer in English
  heldout.jsonl                         held-out Dutch questions with reference answers (evaluation)
Written by this project; no text is copied from elsewhere.
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

# (Dutch country, Dutch capital, English country, English capital)
CAPITALS = [
    ("Frankrijk", "Parijs", "France", "Paris"), ("Duitsland", "Berlijn", "Germany", "Berlin"),
    ("België", "Brussel", "Belgium", "Brussels"), ("Spanje", "Madrid", "Spain", "Madrid"),
    ("Italië", "Rome", "Italy", "Rome"), ("Engeland", "Londen", "England", "London"),
    ("Japan", "Tokio", "Japan", "Tokyo"), ("Noorwegen", "Oslo", "Norway", "Oslo"),
    ("Zweden", "Stockholm", "Sweden", "Stockholm"), ("Denemarken", "Kopenhagen", "Denmark", "Copenhagen"),
    ("Polen", "Warschau", "Poland", "Warsaw"), ("Oostenrijk", "Wenen", "Austria", "Vienna"),
    ("Griekenland", "Athene", "Greece", "Athens"), ("Portugal", "Lissabon", "Portugal", "Lisbon"),
    ("Ierland", "Dublin", "Ireland", "Dublin"), ("Egypte", "Caïro", "Egypt", "Cairo"),
    ("Rusland", "Moskou", "Russia", "Moscow"), ("China", "Peking", "China", "Beijing"),
    ("Canada", "Ottawa", "Canada", "Ottawa"), ("Turkije", "Ankara", "Turkey", "Ankara"),
    ("Hongarije", "Boedapest", "Hungary", "Budapest"), ("Finland", "Helsinki", "Finland", "Helsinki"),
    ("Zwitserland", "Bern", "Switzerland", "Bern"), ("Tsjechië", "Praag", "Czechia", "Prague"),
]
# (Dutch thing, Dutch colour, English thing, English colour)
COLOURS = [
    ("gras", "groen", "grass", "green"), ("sneeuw", "wit", "snow", "white"), ("een banaan", "geel", "a banana", "yellow"),
    ("de lucht", "blauw", "the sky", "blue"), ("een tomaat", "rood", "a tomato", "red"), ("steenkool", "zwart", "coal", "black"),
    ("melk", "wit", "milk", "white"), ("een citroen", "geel", "a lemon", "yellow"), ("een aardbei", "rood", "a strawberry", "red"),
    ("de zee", "blauw", "the sea", "blue"), ("een kraai", "zwart", "a crow", "black"), ("een blad in de zomer", "groen", "a leaf in summer", "green"),
]
# (Dutch word, Dutch opposite, English word, English opposite)
OPPOSITES = [
    ("warm", "koud", "warm", "cold"), ("groot", "klein", "big", "small"), ("snel", "langzaam", "fast", "slow"),
    ("blij", "verdrietig", "happy", "sad"), ("licht", "donker", "light", "dark"), ("open", "dicht", "open", "closed"),
    ("oud", "jong", "old", "young"), ("vroeg", "laat", "early", "late"), ("vol", "leeg", "full", "empty"),
    ("hard", "zacht", "hard", "soft"), ("sterk", "zwak", "strong", "weak"), ("rijk", "arm", "rich", "poor"),
    ("nat", "droog", "wet", "dry"), ("goed", "slecht", "good", "bad"), ("hoog", "laag", "high", "low"),
    ("lang", "kort", "long", "short"), ("schoon", "vies", "clean", "dirty"), ("dag", "nacht", "day", "night"),
]
CITIES = [
    ("Amsterdam", "Noord-Holland", "de grachten"), ("Rotterdam", "Zuid-Holland", "de haven"),
    ("Utrecht", "Utrecht", "de Domtoren"), ("Groningen", "Groningen", "de Martinitoren"),
    ("Maastricht", "Limburg", "de Maas"), ("Leiden", "Zuid-Holland", "de oude universiteit"),
    ("Haarlem", "Noord-Holland", "de Grote Markt"), ("Delft", "Zuid-Holland", "het blauwe aardewerk"),
    ("Zwolle", "Overijssel", "de stadsmuur"), ("Arnhem", "Gelderland", "de Rijn"),
    ("Nijmegen", "Gelderland", "de Waal"), ("Eindhoven", "Noord-Brabant", "de techniek"),
    ("Breda", "Noord-Brabant", "het kasteel"), ("Leeuwarden", "Friesland", "de Oldehove"),
    ("Middelburg", "Zeeland", "de abdij"), ("Assen", "Drenthe", "de bossen"),
    ("Alkmaar", "Noord-Holland", "de kaasmarkt"), ("Gouda", "Zuid-Holland", "de kaas"),
    ("Den Bosch", "Noord-Brabant", "de Sint-Jan"), ("Deventer", "Overijssel", "de boekenmarkt"),
]
TEMPLATES = [
    "{stad} is een stad in de provincie {provincie}. De stad is bekend om {bekend}. In het centrum zijn smalle "
    "straten, oude huizen en gezellige cafés. Op zaterdag is er markt en kopen de mensen verse groenten, kaas en brood.",
    "Wie in {stad} woont, fietst elke dag. Kinderen fietsen naar school en volwassenen fietsen naar hun werk. "
    "Als het regent, trekken ze een regenjas aan en fietsen ze gewoon verder. Dat is heel normaal in {provincie}.",
    "In de winter is het in {stad} vaak koud en nat. Soms vriest het en dan gaan de mensen schaatsen op het ijs. "
    "In de zomer is het warmer en zitten de inwoners buiten op een terras bij {bekend}.",
]


def write(name, rows):
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    paragraphs = {city: [t.format(stad=city, provincie=prov, bekend=known) for t in TEMPLATES]
                  for city, prov, known in CITIES}
    held_cities = [c for c, _, _ in CITIES[-4:]]
    write("corpus.jsonl", [{"text": p} for c, ps in paragraphs.items() if c not in held_cities for p in ps])
    write("corpus_heldout.jsonl", [{"text": p} for c in held_cities for p in paragraphs[c]])

    qa = []  # (Dutch question, Dutch answer, English answer)
    for land, stad, country, city in CAPITALS:
        qa.append((f"Wat is de hoofdstad van {land}?", f"De hoofdstad van {land} is {stad}.",
                   f"The capital of {country} is {city}."))
    for ding, kleur, thing, colour in COLOURS:
        qa.append((f"Welke kleur heeft {ding}?", f"{ding[0].upper() + ding[1:]} is {kleur}.",
                   f"{thing[0].upper() + thing[1:]} is {colour}."))
    for woord, tegen, word, opposite in OPPOSITES:
        qa.append((f"Wat is het tegenovergestelde van '{woord}'?", f"Het tegenovergestelde van '{woord}' is '{tegen}'.",
                   f"The opposite of '{word}' is '{opposite}'."))
    random.Random(7).shuffle(qa)
    held, sft, pref = qa[:12], qa[12:33], qa[33:]
    write("sft.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                        for q, a, _ in sft])
    write("preference.jsonl", [{"prompt": q, "chosen": a, "rejected": en} for q, a, en in pref])
    write("preference_heldout.jsonl", [{"prompt": q, "chosen": a, "rejected": en} for q, a, en in held])
    write("heldout.jsonl", [{"prompt": q, "completion": a} for q, a, _ in held])
    print(f"corpus {len(paragraphs) * 3 - 12} paragraphs (+12 held out), sft {len(sft)}, "
          f"preference {len(pref)}, held-out questions {len(held)}")


if __name__ == "__main__":
    main()
