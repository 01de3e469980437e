"""Write small preference files in the layouts of real public datasets, deterministically.

  .venv/bin/python data/build_real_prefs.py            # writes data/prefs/real/*.jsonl
  .venv/bin/python data/build_real_prefs.py --out DIR

  hh_rlhf.jsonl          Anthropic HH-RLHF: `chosen`/`rejected` are whole transcripts
                         "\\n\\nHuman: ...\\n\\nAssistant: ...", single- and multi-turn; on most rows both replies
                         open with the same words ("Sure! ..."), the case a longest-common-prefix split gets wrong
  ultrafeedback.jsonl    UltraFeedback-binarized: `prompt` string, `chosen`/`rejected` message lists that repeat
                         the user turn, plus `prompt_id`, `messages`, `score_chosen`, `score_rejected`
  conversational.jsonl   TRL conversational: `prompt` message list (a system message on some rows, earlier
                         turns on others), `chosen`/`rejected` one assistant message each

The text is a hand-written bank of everyday questions with a helpful answer and a worse one (vague, wrong or
evasive); replies run about 30-150 tokens. Seeded: the output is byte-identical on every run.
"""

import argparse
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 0
OUT = Path(__file__).resolve().parent / "prefs" / "real"


@dataclass
class Topic:
    """A user question with a helpful and a worse answer; fq/fgood/fbad: an optional follow-up turn."""

    q: str
    good: str
    bad: str
    fq: str | None = None
    fgood: str | None = None
    fbad: str | None = None


TOPICS = [
    Topic(
        q="What's the best way to boil an egg so the yolk is still a little soft?",
        good="Bring a pot of water to a gentle boil, then lower the eggs in with a spoon so they don't "
             "crack. For a jammy yolk, cook them for six and a half to seven minutes. Move them straight "
             "into a bowl of ice water for a couple of minutes to stop the cooking, then peel them under "
             "running water. Eggs straight from the fridge may need an extra thirty seconds.",
        bad="Just boil them for a while until they look done. Most people do around fifteen minutes, and "
            "then you can peel them whenever you like. If the yolk comes out hard, that is just how eggs "
            "are, and there isn't much you can do about it.",
        fq="How do I keep them from cracking when they go in the water?",
        fgood="A few things help. Let the eggs sit on the counter for ten minutes so they are not ice "
              "cold, lower them in slowly with a slotted spoon, and keep the water at a gentle simmer "
              "rather than a rolling boil. Some people also add a splash of vinegar, which won't stop a "
              "crack but helps the white set quickly if one does appear.",
        fbad="Cracking is just something that happens with eggs. You could try buying a different brand, "
             "or just accept that a few of them will break. It doesn't really matter much since you peel "
             "them anyway.",
    ),
    Topic(
        q="The leaves on my pothos are turning yellow. What am I doing wrong?",
        good="Yellow leaves on a pothos are most often a sign of overwatering. Check the soil: if it is "
             "still damp an inch or two down, wait before watering again, and make sure the pot has a "
             "drainage hole. If only one or two old leaves near the base are yellow, that is normal "
             "aging. Too little light can also cause it, so a spot with bright, indirect light is ideal.",
        bad="Yellow leaves usually mean the plant needs more water, so try watering it every day until "
            "the leaves turn green again. You can also cut off all of the yellow leaves and add plenty of "
            "fertilizer, which usually fixes the problem within a few days.",
        fq="How often should I water it then?",
        fgood="There is no fixed schedule, because it depends on the light, the pot and the season. A "
              "simple rule is to water thoroughly when the top third of the soil feels dry, then let the "
              "extra water drain away. Indoors that often works out to about once a week in summer and "
              "every ten days to two weeks in winter.",
        fbad="Every day is best for most houseplants, since they dry out quickly indoors. A full glass of "
             "water each morning should keep it happy, even in winter.",
    ),
    Topic(
        q="Can you explain compound interest in simple terms?",
        good="Compound interest means you earn interest on your interest. Say you put $1,000 in an "
             "account that pays 5% a year. After the first year you have $1,050. In the second year you "
             "earn 5% on $1,050, not just on the original $1,000, so you end up with $1,102.50. Over many "
             "years this snowball effect grows your money much faster than simple interest does.",
        bad="Compound interest is when the bank charges you interest on a loan. It is basically the same "
            "as simple interest but with a different name. It doesn't really matter for savings accounts, "
            "so you don't need to worry about it unless you are borrowing money.",
        fq="So how long would it take to double my money at 5%?",
        fgood="A handy shortcut is the rule of 72: divide 72 by the interest rate. At 5% a year, 72 "
              "divided by 5 is about 14.4, so your money would roughly double in a little over fourteen "
              "years, assuming the interest is reinvested and the rate stays the same.",
        fbad="At 5% it would take exactly twenty years, because 5 times 20 is 100 percent. Compounding "
             "doesn't change that much, so twenty years is the number to plan around.",
    ),
    Topic(
        q="I have trouble falling asleep at night. Any tips?",
        good="A few habits make a real difference. Try to go to bed and get up at the same time every "
             "day, even on weekends. Put screens away about an hour before bed, since the light and the "
             "scrolling keep your brain alert. Keep the bedroom cool, dark and quiet, and avoid caffeine "
             "after early afternoon. If you can't fall asleep after twenty minutes, get up and do "
             "something calm until you feel sleepy.",
        bad="Everyone has trouble sleeping sometimes. You could try watching TV in bed until you get "
            "tired, or have a cup of coffee if you wake up groggy. It usually sorts itself out on its own.",
        fq="What if my mind keeps racing when I lie down?",
        fgood="That is very common. Some people find it helps to write down whatever is on their mind, or "
              "a short to-do list for tomorrow, before getting into bed. Slow breathing also works well: "
              "breathe in for four counts, hold for a moment, and breathe out for six. If racing thoughts "
              "keep you up most nights, it is worth talking to a doctor.",
        fbad="Just try not to think about anything. Eventually you will fall asleep. If that doesn't "
             "work, you could check your phone for a while until you feel tired.",
    ),
    Topic(
        q="How do I get a red wine stain out of a carpet?",
        good="Act quickly and blot, don't rub. Press a clean cloth on the stain to soak up as much wine "
             "as you can. Then pour a little cold water on it and blot again. Mix a tablespoon of dish "
             "soap and a tablespoon of white vinegar in two cups of warm water, sponge it on, and keep "
             "blotting until the color lifts. Finish with plain water and let it dry.",
        bad="Scrub it hard with hot water and some bleach. That should take care of most stains. If the "
            "color is still there, keep scrubbing, because wine always comes out in the end.",
    ),
    Topic(
        q="What's the difference between weather and climate?",
        good="Weather is what the atmosphere is doing right now or over the next few days: rain this "
             "afternoon, a cold snap this week. Climate is the long-term pattern, usually averaged over "
             "thirty years or more, such as how warm and wet a region tends to be in each season. A handy "
             "way to remember it: climate is what you expect, weather is what you get.",
        bad="They mean the same thing. Climate is just the scientific word for weather, and people use "
            "them interchangeably. So a cold week in summer tells you the climate is changing.",
    ),
    Topic(
        q="Can you help me write a polite email declining a meeting invitation?",
        good="Of course. Here is a short version you can adapt:\n\nHi Jordan,\n\nThank you for the "
             "invitation to Thursday's planning meeting. Unfortunately I have a conflict at that time and "
             "won't be able to attend. Could you share the notes afterwards? I'm happy to follow up on "
             "anything that needs my input.\n\nBest regards,\nSam",
        bad="You can just write: I can't come to the meeting. Thanks. There is no need to explain "
            "yourself or offer anything else, since people are busy and don't read long emails anyway.",
    ),
    Topic(
        q="How much water should I drink every day?",
        good="A common guideline is about eight cups, roughly two liters, but needs vary with your size, "
             "how active you are and the weather. Food provides some water too. A simple check is the "
             "color of your urine: pale yellow usually means you are drinking enough. Drink more when you "
             "exercise, when it is hot, or if you are unwell with a fever.",
        bad="You should drink at least five liters a day no matter what. More is always better for your "
            "body, and it is impossible to drink too much water, so keep a bottle with you and sip it "
            "constantly.",
    ),
    Topic(
        q="Why is the sky blue?",
        good="Sunlight contains all the colors of the rainbow. As it passes through the air, it bumps "
             "into gas molecules, and shorter wavelengths like blue are scattered much more than longer "
             "ones like red. That scattered blue light reaches your eyes from every direction in the sky, "
             "so the whole sky looks blue. At sunset the light travels through more air, so more blue is "
             "scattered away and you see oranges and reds.",
        bad="The sky is blue because it reflects the color of the oceans, which cover most of the planet. "
            "That is also why the sky looks gray on cloudy days, when the clouds block the reflection.",
    ),
    Topic(
        q="I want to start running but I'm completely out of shape. How should I begin?",
        good="Start with a run-walk plan rather than trying to run continuously. For example, warm up "
             "with five minutes of brisk walking, then alternate one minute of easy jogging with two "
             "minutes of walking for twenty minutes. Do this three times a week and gradually lengthen "
             "the running intervals. Go slowly enough that you could hold a conversation, and get a pair "
             "of comfortable running shoes.",
        bad="Just go out and run as far as you can every day. Your body will get used to it after a "
            "couple of weeks. Any pain in your knees or shins is normal, so push through it and don't "
            "take rest days.",
        fq="How long until I can run for thirty minutes without stopping?",
        fgood="For most beginners who follow a run-walk plan three times a week, eight to ten weeks is "
              "realistic. Progress is not always steady, so it is fine to repeat a week if it felt hard. "
              "The main thing is to increase slowly, since doing too much too soon is the most common "
              "cause of injury for new runners.",
        fbad="You should be able to do it after a week if you push yourself. If you can't, running might "
             "just not be for you.",
    ),
    Topic(
        q="In Python, what's the difference between a list and a tuple?",
        good="Both hold an ordered sequence of items, but a list is mutable and a tuple is not. You can "
             "append to, remove from or change the items of a list, while a tuple stays the same once "
             "created. Tuples are written with parentheses, like (1, 2, 3), and lists with square "
             "brackets, like [1, 2, 3]. Because they are immutable, tuples can be used as dictionary keys "
             "and are a good fit for fixed records.",
        bad="There is no real difference, they are just two ways of writing the same thing. Use whichever "
            "you prefer. Python converts between them automatically, so the choice won't affect how your "
            "program works.",
        fq="When would I actually pick a tuple over a list?",
        fgood="Pick a tuple when the group of values has a fixed meaning and should not change, such as a "
              "point (x, y), an RGB color, or a function that returns several values at once. Pick a list "
              "when you will add, remove or sort items, like a list of tasks. Tuples also signal to "
              "readers of your code that the data is not meant to be modified.",
        fbad="You would pick a tuple when you need it to be faster. Otherwise, always use lists, since "
             "tuples are an older feature that is mostly kept for compatibility.",
    ),
    Topic(
        q="How do I fix a flat tire on my bike?",
        good="First remove the wheel, then use tire levers to pry one side of the tire off the rim and "
             "pull out the inner tube. Pump a little air into the tube to find the hole, and check the "
             "inside of the tire for a thorn or piece of glass. Either patch the hole or use a new tube. "
             "Tuck the tube back in, work the tire onto the rim with your thumbs, and inflate it to the "
             "pressure printed on the tire.",
        bad="You will need to take it to a bike shop. It's not something you can do at home without "
            "special tools, and most people who try it end up damaging the wheel.",
    ),
    Topic(
        q="I have a job interview next week. How should I prepare?",
        good="Start by researching the company: what it does, its recent news and the team you would "
             "join. Reread the job description and prepare a short story for each main requirement "
             "showing how you have done it before. Practice answering common questions out loud, such as "
             "why you want the role. Prepare two or three thoughtful questions to ask them, plan your "
             "route or test your video setup, and get a good night's sleep beforehand.",
        bad="Don't overthink it. Interviews are mostly luck, so just show up and see how it goes. "
            "Preparing answers in advance usually makes you sound rehearsed, and they can tell.",
        fq="What kind of questions should I ask them at the end?",
        fgood="Good questions show you are thinking about doing the job well. You could ask what success "
              "would look like in the first three months, what the biggest challenge facing the team is "
              "right now, or how the team usually works together day to day. Avoid questions you could "
              "answer from their website, and save salary details for later in the process unless they "
              "bring it up.",
        fbad="Ask how much vacation you get and whether you can work from home every day. Those are the "
             "things that really matter, so it is best to find out right away.",
    ),
    Topic(
        q="What causes the seasons?",
        good="The seasons happen because Earth's axis is tilted by about 23.5 degrees. As Earth orbits "
             "the Sun, the half of the planet tilted toward the Sun gets more direct sunlight and longer "
             "days, which makes it summer there. Six months later that same half is tilted away, so the "
             "sunlight is weaker and the days are shorter, giving winter. That is why the seasons are "
             "reversed in the two hemispheres.",
        bad="Seasons happen because the Earth gets closer to the Sun in summer and farther away in "
            "winter. The closer we are, the hotter it gets, which is why July is warm everywhere on the "
            "planet.",
    ),
    Topic(
        q="How can I keep bread from going stale so quickly?",
        good="Store bread at room temperature in a bread box or a paper bag inside a plastic bag, which "
             "keeps it from drying out without trapping too much moisture. Avoid the fridge, since cold "
             "temperatures actually make bread go stale faster. If you won't finish a loaf within two or "
             "three days, slice it and freeze it, then toast slices straight from the freezer.",
        bad="Put it in the fridge. The cold keeps everything fresh longer, including bread. A loaf can "
            "last a couple of weeks in there if you keep it in its original plastic bag.",
    ),
    Topic(
        q="How do vaccines work?",
        good="A vaccine trains your immune system to recognize a germ without you having to get sick "
             "first. It contains a harmless piece or weakened version of the germ, or instructions for "
             "your cells to make one of its proteins. Your immune system responds by making antibodies "
             "and memory cells. If you later meet the real germ, your body recognizes it and fights it "
             "off much faster.",
        bad="Vaccines work by killing any germs that are already in your body, a bit like an antibiotic. "
            "That is why you get one when you are already sick, and why the effect wears off after a few "
            "days.",
    ),
    Topic(
        q="Is it too late to learn a new language as an adult?",
        good="Not at all. Adults often learn faster than children in the early stages because they can "
             "use study strategies and understand grammar explanations. The main difference is that an "
             "accent is harder to lose. What matters most is regular practice: a little every day beats a "
             "long session once a week. Mixing listening, speaking with real people, and reading things "
             "you enjoy will take you a long way.",
        bad="Yes, after about age twelve the brain can't really pick up a new language anymore, so it's "
            "mostly a waste of time. You would be better off using a translation app, which is good "
            "enough for most situations now.",
        fq="How much time a day should I spend on it?",
        fgood="Even fifteen to thirty minutes a day is enough to make steady progress, as long as you do "
              "it consistently. Use part of the time for review with flashcards, and part for something "
              "more active, like listening to a podcast or speaking with a partner. If you can add a "
              "longer session on the weekend, that helps too.",
        fbad="You need at least four hours a day or you won't get anywhere. Anything less is too little "
             "to remember, so it is better to wait until you have more free time.",
    ),
    Topic(
        q="What's a simple way to make a monthly budget?",
        good="A popular starting point is the 50/30/20 rule. Put about 50% of your take-home pay toward "
             "needs like rent, groceries and bills, 30% toward wants like eating out and hobbies, and 20% "
             "toward savings and paying off debt. Track your spending for a month first to see where your "
             "money actually goes, then adjust the categories to fit your situation.",
        bad="Just try to spend less than you did last month. Budgets are too complicated for most people, "
            "and tracking every purchase takes more time than it saves. If you run short, a credit card "
            "can cover the gap.",
    ),
    Topic(
        q="How do I make a simple tomato sauce for pasta?",
        good="Warm a few tablespoons of olive oil in a pan and gently cook two sliced garlic cloves until "
             "they just start to turn golden. Add a can of crushed tomatoes, a pinch of salt and a pinch "
             "of chili flakes if you like. Let it simmer for about twenty minutes, stirring now and then, "
             "until it thickens. Finish with torn basil and a little more olive oil, and toss it with the "
             "pasta.",
        bad="Mix some ketchup with hot water and pour it over the pasta. It tastes about the same, and it "
            "saves you from chopping garlic or waiting for a sauce to simmer.",
        fq="Can I make it ahead and freeze it?",
        fgood="Yes, tomato sauce freezes very well. Let it cool completely, then pack it into airtight "
              "containers or freezer bags, leaving a little room for it to expand. It keeps for about "
              "three months. Thaw it overnight in the fridge and reheat it gently, adding the fresh basil "
              "only after reheating.",
        fbad="No, sauce goes bad in the freezer, so it is better to make it fresh every time. Freezing "
             "changes the taste of tomatoes completely and makes the sauce watery.",
    ),
    Topic(
        q="Can you explain photosynthesis to a ten-year-old?",
        good="Plants make their own food using sunlight. Their leaves take in carbon dioxide from the "
             "air, and their roots pull up water from the soil. Inside the leaves, a green substance "
             "called chlorophyll captures energy from sunlight and uses it to turn the water and carbon "
             "dioxide into sugar, which the plant uses to grow. As a bonus, the plant releases oxygen, "
             "which is the air we breathe.",
        bad="Photosynthesis is a complex biochemical process involving the light-dependent reactions and "
            "the Calvin cycle in the chloroplast stroma, where ATP and NADPH drive the fixation of carbon "
            "dioxide by the enzyme RuBisCO into three-carbon sugars.",
    ),
    Topic(
        q="My upstairs neighbor is really noisy late at night. How should I handle it?",
        good="Start with a friendly, low-pressure conversation at a calm time, not in the middle of the "
             "noise. They may not realize how much sound carries. Explain what you hear and when, and "
             "suggest something specific, like rugs or keeping things quieter after ten. If that doesn't "
             "help, check your lease or building rules and contact your landlord or building manager.",
        bad="Bang on the ceiling with a broom every time they make noise. They will get the message "
            "eventually. You could also play loud music back at them so they know how it feels.",
    ),
    Topic(
        q="What's the easiest way to back up my phone photos?",
        good="The simplest option is to turn on your phone's built-in cloud backup, such as iCloud Photos "
             "on an iPhone or Google Photos on Android, so new pictures upload automatically over Wi-Fi. "
             "For extra safety, also copy them to a computer or an external drive every few months. "
             "Having two copies in different places means one failure won't cost you your pictures.",
        bad="Your photos are already saved on your phone, so you don't really need a backup. Phones "
            "rarely break or get lost, and deleted pictures can usually be recovered later anyway.",
        fq="Is the free storage enough?",
        fgood="It depends on how many photos and videos you take. The free tiers are usually between 5 "
              "and 15 gigabytes, which fills up quickly if you record a lot of video. You can check how "
              "much space your library uses in the phone's settings. If it is close to the limit, a small "
              "paid plan is cheap, or you can rely more on the external drive.",
        fbad="Yes, free storage is unlimited on every phone, so you never need to think about it. Just "
             "keep taking photos and videos and they will all be saved.",
    ),
    Topic(
        q="How can I tell if a cantaloupe is ripe?",
        good="Look at the stem end first: a ripe cantaloupe has a smooth, slightly sunken spot where it "
             "came off the vine easily. The rind under the netting should be tan or golden rather than "
             "green. Press the blossom end gently, opposite the stem; it should give a little. Finally, "
             "smell it there: a ripe one has a sweet, musky scent.",
        bad="Just pick the biggest one. Size is the best sign that a melon is ripe, and the color or "
            "smell won't tell you much. If it turns out hard, leave it on the counter for an hour.",
    ),
    Topic(
        q="What's the difference between a virus and a bacterium?",
        good="Bacteria are single-celled living organisms that can reproduce on their own, and many of "
             "them are harmless or even helpful, like the ones in your gut. Viruses are much smaller and "
             "can only reproduce by getting inside a living cell and hijacking it. That difference "
             "matters for treatment: antibiotics can kill bacteria but do nothing against viruses.",
        bad="A virus is just a very small bacterium. Antibiotics work on both of them, so if you have a "
            "cold or the flu, it is a good idea to ask your doctor for antibiotics straight away.",
    ),
]

OPENERS = ["Sure! ", "Great question. ", "Of course. ", "Happy to help. ", "Good question! ", "Absolutely. ",
           "I can help with that. ", "Sure, "]
SYSTEMS = ["You are a friendly and concise assistant.",
           "You are a helpful assistant. Answer clearly and accurately.",
           "You are an assistant that gives practical, step-by-step advice."]


def reply_pair(rng, good, bad, shared_opener):
    """(chosen, rejected) replies; with `shared_opener` both start with the same words, as in many HH rows."""
    if shared_opener:
        o = rng.choice(OPENERS)
        return o + good, o + bad
    return good, bad


def dialogues(rng):
    """(history, question, chosen, rejected) per row: single-turn rows for every topic, then multi-turn ones."""
    out = []
    for t in TOPICS:
        out.append(([], t.q, *reply_pair(rng, t.good, t.bad, rng.random() < 0.6)))
    for t in TOPICS:
        if t.fq:
            history = [("user", t.q), ("assistant", t.good)]
            out.append((history, t.fq, *reply_pair(rng, t.fgood, t.fbad, rng.random() < 0.6)))
    return out


def hh_text(history, question, reply):
    turns = history + [("user", question), ("assistant", reply)]
    return "".join(f"\n\n{'Human' if role == 'user' else 'Assistant'}: {text}" for role, text in turns)


def hh_rows(rng):
    return [{"chosen": hh_text(h, q, c), "rejected": hh_text(h, q, r)} for h, q, c, r in dialogues(rng)]


def ultrafeedback_rows(rng):
    rows = []
    for h, q, c, r in dialogues(rng):
        if h:
            continue  # UltraFeedback is single-turn
        user = {"role": "user", "content": q}
        chosen = [user, {"role": "assistant", "content": c}]
        rows.append({"prompt": q, "prompt_id": hashlib.sha256(q.encode()).hexdigest(), "chosen": chosen,
                     "rejected": [user, {"role": "assistant", "content": r}], "messages": chosen,
                     "score_chosen": rng.choice([7.0, 7.5, 8.0, 8.5, 9.0, 10.0]),
                     "score_rejected": rng.choice([2.0, 3.0, 4.0, 5.0, 6.0, 6.5])})
    return rows


def conversational_rows(rng):
    rows = []
    for h, q, c, r in dialogues(rng):
        prompt = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.4 else []
        prompt += [{"role": role, "content": text} for role, text in h] + [{"role": "user", "content": q}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": c}],
                     "rejected": [{"role": "assistant", "content": r}]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, build in (("hh_rlhf", hh_rows), ("ultrafeedback", ultrafeedback_rows),
                        ("conversational", conversational_rows)):
        rows = build(random.Random(f"{SEED}-{name}"))
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{args.out / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
