"""Pretraining text: the shop handbook and notes, everyday prose, and chat dialogues on other topics.

None of this is the chat data set: the handbook states the same facts in different words, so
fine-tuning on the chat set still has something to teach (the question-answer format and the exact
phrasing), and the general dialogues teach the chat template on unrelated subjects.
"""

from __future__ import annotations

import random

from . import facts as F

HANDBOOK = [
    f"""{F.NAME} is a small bakery and cafe at {F.ADDRESS}. It was opened by {F.OWNER} in a former
hardware shop next to the post office. The bread is baked on site every morning by {F.HEAD_BAKER} and
his team, and the cafe is run by {F.MANAGER}. Regulars know the place for its sourdough, its cinnamon
buns and the long window bench where people sit with a flat white and the newspaper.""",
    f"""Opening hours. The shop is open {F.HOURS_SHORT}. On bank holidays the doors are open
{F.BANK_HOLIDAY}, even when the holiday falls on a Monday. The kitchen stops taking hot food orders
{F.LAST_HOT_FOOD}. Monday is the day off for the bakers and the day of the weekly deep clean.""",
    """The bread. Every loaf is shaped by hand. The sourdough is made from a starter that is older than
the shop itself and is fed twice a day. The seeded rye loaf has sunflower, pumpkin and sesame seeds.
Baguettes are baked three times a day so that there are always fresh ones at lunch. Loaves are sliced
free of charge on request. On Saturdays the sourdough usually sells out in the early afternoon, so
customers often reserve a loaf by phone the day before.""",
    "The price board. " + " ".join(
        f"The {name} costs {F.price(name)}." for name in F.MENU
    ) + f" An extra shot of espresso is {F.EXTRA_SHOT}. The cafe offers {F.PLANT_MILK}, and gives {F.REUSABLE_CUP}.",
    """Allergens. The kitchen uses wheat, rye, milk, eggs, soya, sesame, celery, almonds, walnuts and
hazelnuts every day. The allergen folder next to the till lists the allergens of every product, and
the staff are trained to check it with the customer rather than answer from memory. Because flour is
in the air all day, nothing is sold as safe for people with coeliac disease, and because nuts are used
daily, nothing can be promised free from traces of nuts.""",
    """Vegan food. The sourdough, the seeded rye and the baguette contain no animal products, and
neither does the lentil roll. The soup is vegan on Tuesdays and Thursdays. The croissants and other
pastries are made with butter, milk and egg.""",
    f"""Celebration cakes. Cakes are made to order with at least {F.CAKE_NOTICE} notice. The sizes are
simple: {F.CAKE_SIZES}. The flavours on offer are {F.CAKE_FLAVOURS}. Writing on the cake is free. A
deposit of {F.CAKE_DEPOSIT} is taken with each order and given back if the order is cancelled at least
48 hours before collection.""",
    f"""Catering. Offices and clubs order platters for meetings and events. The minimum order is for
{F.CATERING_MIN}, with {F.CATERING_NOTICE} notice: {F.CATERING_PRICES}. Delivery is
{F.CATERING_DELIVERY}. A vegan sandwich platter is possible; a gluten-free one is not. Every catering
order is sent a VAT invoice by email.""",
    f"""Deliveries. The van goes out {F.DELIVERY_DAYS} and covers everything within
{F.DELIVERY_RADIUS} of the shop. Orders must reach the shop by {F.DELIVERY_CUTOFF}. The minimum order
is {F.DELIVERY_MIN}, and delivery costs {F.DELIVERY_FEE}. There are no deliveries on Sundays or Mondays.""",
    f"""The Kettle Club. The loyalty card gives {F.LOYALTY}. The stamps do not expire, but the cards are
not registered, so lost stamps cannot be replaced. Pastries and bread do not earn stamps.""",
    f"""Other services. Gift vouchers come in {F.GIFT_VOUCHERS}. The cafe can be hired on
{F.PRIVATE_HIRE}. There are {F.SEATS_INSIDE} seats inside and {F.SEATS_TERRACE} on the terrace, and groups
of six or more may book on weekdays. The cafe has {F.WIFI}. Dogs are welcome on the terrace, and
assistance dogs inside. The side door on Mill Walk has a ramp, and there is an accessible toilet.""",
    """Refunds. When a customer is unhappy with something bought that day, the staff replace it or give
the money back, as the customer prefers. A receipt helps, but a card payment can also be found on the
card machine. Complaints that arrive later go to the manager.""",
    """Shifts. The bakers start at five in the morning and finish at one. The early counter shift runs
from seven to three and the late counter shift from ten until half past five. Shifts of more than six
hours include a paid break of twenty minutes. The rota for the following week goes up every Thursday
by noon. Swaps need the agreement of both people and the manager's approval. Holiday is requested two
weeks ahead on the sheet in the back room.""",
    """Sickness. Anyone who cannot come to work phones the manager as early as possible, before six for
the bake shift. Anyone who has had vomiting or diarrhoea stays away from food for forty-eight hours
after the symptoms stop.""",
    f"""Suppliers. Flour comes from {F.FLOUR_SUPPLIER} on Tuesdays and Fridays. Milk, butter and cream come
from {F.DAIRY_SUPPLIER} every morning except Monday. Coffee beans are roasted by {F.COFFEE_SUPPLIER} and
arrive each Wednesday. All suppliers are paid by bank transfer on thirty-day terms, and the owner
approves payments on Fridays. Deliveries are checked against the note, and chilled goods must arrive at
five degrees or colder.""",
    f"""Money. At closing time the till is cashed up against the Z-report, and the float of £150 goes back
into the safe. Receipts for petty cash go into the tin and are typed into the Kettle ledger every Monday.
Invoices and receipts are kept for six years. The bank account is reconciled by the fifth of each month.
The shop is registered for VAT under number {F.VAT_NUMBER}; {F.ACCOUNTANT} prepares the quarterly VAT
returns. Cold takeaway food is zero-rated, while hot food, hot drinks and anything eaten in carry the
standard rate of twenty per cent.""",
]

STORIES = [
    """At five o'clock the street is dark and quiet, and the only light on Orchard Lane comes from the
bakery. Tom turns on the ovens, checks the starter and begins to shape the first loaves. By seven the
windows are steamed up, the baguettes are cooling on the racks, and the smell of cinnamon reaches the
bus stop.""",
    """Mrs Patel comes in every Tuesday for a seeded rye loaf and a pot of tea. She sits by the window,
reads the local paper and tells whoever is on the counter about her grandchildren. When her card was
full last month, she gave the free drink to the young man behind her in the queue.""",
    """On the first warm Saturday of spring the terrace filled up before nine. Two dogs shared the water
bowl, a cyclist asked for directions to the river, and the lemon drizzle ran out before lunch.""",
    """The new barista was nervous on her first morning. Priya showed her how to steam milk, how to
read the order screen and where the allergen folder was kept. By the end of the week she knew the
names of half the regulars and how each of them liked their coffee.""",
    """A power cut hit the street one Thursday in November. The ovens went cold in the middle of the
second bake. The team sold what was already cooling, made tea on a camping stove, and wrote the day's
story on the board outside. Customers still talk about it.""",
    """Every evening the bread that has not been sold is bagged up. Some of it goes home with the staff,
and the rest is collected by volunteers from the community pantry, who share it out the same night.""",
]

EVERYDAY = [
    """Making bread at home takes time more than skill. Mix flour, water, salt and yeast, knead the dough
until it is smooth, and let it rise somewhere warm until it has doubled. Shape it, let it rise again, and
bake it in a hot oven until the bottom sounds hollow when you tap it.""",
    """A good morning routine does not need to be complicated. Get up at the same time each day, drink a
glass of water, open the curtains and do the hardest task first. Small habits repeated every day matter
more than big plans made once.""",
    """Autumn is the season for soups. Onions, carrots and celery make the base of most of them. Add
whatever vegetables are in season, cover them with stock, and simmer until everything is soft. A little
lemon juice at the end brightens the flavour.""",
    """Keeping a small business organised means writing things down. A simple list of what is owed, what
is due and who needs a reply saves hours at the end of the month. Many owners set aside one hour every
week just for paperwork.""",
    """When you write a short email, put the request in the first sentence, give the details after it,
and end with a clear next step. People read on their phones, so short paragraphs are kinder than long ones.""",
    """Tomatoes grow best in full sun with regular watering. Pinch out the side shoots, tie the stems to
a cane, and feed the plants once a week when the first flowers appear.""",
    """Trains are often quicker than driving for short trips into the city. Buy the ticket before you
travel, check the platform on the board, and keep the ticket until you leave the station at the other end.""",
    """Saving money starts with knowing where it goes. For one month, write down everything you spend.
Most people are surprised by the small daily costs that add up, like snacks, subscriptions and taxis.""",
    """Rain is forecast for most of the week, with sunny spells on Thursday afternoon. Temperatures will
stay between eight and twelve degrees, and the wind will pick up along the coast at the weekend.""",
    """The library on the high street opens at nine and closes at six. It has free computers, a quiet
study room upstairs, and a children's story hour every Saturday morning.""",
]

# Dialogues on other topics, so the pretrained model already knows the chat layout.
GENERAL_QA = [
    ("How do I boil an egg?", "Put the egg in boiling water: six minutes for a soft yolk, nine minutes for a hard one. Then cool it in cold water."),
    ("How long should I rest after a run?", "Walk for five minutes to cool down, drink some water, and give your legs a day of rest after a long run."),
    ("What is a good way to learn new words?", "Read a little every day, write down new words with an example sentence, and review them again after a few days."),
    ("How do I keep basil alive?", "Give it a sunny windowsill, water it when the top of the soil feels dry, and pick the top leaves so it grows bushy."),
    ("Can you help me write a thank-you note?", "Of course. For example: Dear Sam, thank you so much for your help with the move last weekend. I could not have done it without you. Best wishes, Alex."),
    ("What should I pack for a weekend away?", "Two changes of clothes, something warm, comfortable shoes, a phone charger, your toothbrush and any medicine you need."),
    ("How do I make a cup of tea?", "Boil fresh water, pour it over the tea bag, leave it for three to four minutes, then add milk if you like."),
    ("What's a quick healthy lunch?", "A wholemeal wrap with hummus, salad and some chicken or beans takes five minutes and keeps you full."),
    ("How can I sleep better?", "Go to bed at the same time every night, keep the room cool and dark, and avoid screens for the last half hour."),
    ("How do I get a stain out of a shirt?", "Rinse it with cold water from the back of the fabric, rub in a little washing-up liquid, and wash it as usual."),
    ("What is the difference between weather and climate?", "Weather is what happens on a particular day; climate is the average pattern over many years."),
    ("How do I start running?", "Start with short runs mixed with walking, three times a week, and add a few minutes each week."),
    ("How should I prepare for a job interview?", "Read about the company, prepare two or three examples of your work, and think of a question to ask them at the end."),
    ("What is a budget?", "A budget is a plan for your money: how much comes in, how much goes out, and what is left to save."),
    ("Why do leaves change colour in autumn?", "As days get shorter, trees stop making green chlorophyll, and the yellow and red colours underneath show through."),
    ("How do I cook rice?", "Rinse one cup of rice, add two cups of water and a pinch of salt, bring to the boil, then cover and simmer for twelve minutes."),
    ("Can you suggest a name for a cat?", "How about Pepper, Miso, Luna or Biscuit?"),
    ("What's a good book for a long train journey?", "A novel with short chapters works well, so you can stop at any station. A detective story is a popular choice."),
    ("How do I politely decline an invitation?", "Thank them, say you can't make it, and wish them a lovely time. For example: Thank you for inviting me, sadly I can't come, but I hope it's a great evening."),
    ("What is compound interest?", "Compound interest means you earn interest on your interest as well as on the money you first saved."),
    ("How often should I water a cactus?", "About once every two to three weeks in summer and once a month in winter. Let the soil dry out completely in between."),
    ("What's the best way to store bread?", "Keep it in a bread bin or a paper bag at room temperature for two or three days, or slice it and freeze it."),
    ("How do I fix a squeaky door?", "Put a few drops of oil on the hinges and open and close the door several times."),
    ("Give me a tip for public speaking.", "Practise out loud, speak slowly, and look at a few friendly faces in the room."),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
COLOURS = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"), ("coal", "black"),
           ("a tomato", "red"), ("an orange", "orange")]


def generated_qa(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Simple templated dialogues (arithmetic, days, money, colours) with correct answers."""
    out = []
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            q = rng.choice(["What is {a} plus {b}?", "Can you add {a} and {b}?", "{a} + {b} = ?"]).format(a=a, b=b)
            out.append((q, f"{a} plus {b} is {a + b}."))
        elif kind == 1:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q = rng.choice(["What is {a} times {b}?", "How much is {a} x {b}?"]).format(a=a, b=b)
            out.append((q, f"{a} times {b} is {a * b}."))
        elif kind == 2:
            i, k = rng.randrange(7), rng.randint(1, 6)
            out.append((f"If today is {DAYS[i]}, what day is it in {NUMBER_WORDS[k]} days?",
                        f"It will be {DAYS[(i + k) % 7]}."))
        elif kind == 3:
            pence = rng.randint(110, 990)
            paid = rng.choice([10, 20])
            change = paid * 100 - pence
            out.append((f"I pay £{paid} for something that costs £{pence / 100:.2f}. How much change do I get?",
                        f"Your change is £{change / 100:.2f}."))
        elif kind == 4:
            thing, colour = rng.choice(COLOURS)
            out.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is usually {colour}."))
        else:
            h = rng.randint(6, 20)
            m = rng.choice([0, 15, 30, 45])
            d = rng.choice([15, 30, 45, 60, 90])
            end = h * 60 + m + d
            out.append((f"A meeting starts at {h}:{m:02d} and lasts {d} minutes. When does it end?",
                        f"It ends at {end // 60}:{end % 60:02d}."))
    return out


# Other (fictional) places people ask about in the same way: hours, prices, bookings.
VENUES = {
    "the swimming pool": {"hours": ("6:30", "21:00"), "closed": "Christmas Day",
                          "prices": {"adult swim": 4.80, "child swim": 2.90, "lesson": 8.50}},
    "the library": {"hours": ("9:00", "18:00"), "closed": "Sunday",
                    "prices": {"printing a page": 0.15, "replacement card": 2.00, "late fee per day": 0.25}},
    "the bike shop": {"hours": ("8:30", "17:30"), "closed": "Sunday and Monday",
                      "prices": {"puncture repair": 12.00, "full service": 65.00, "brake adjustment": 15.00}},
    "the garden centre": {"hours": ("9:00", "17:00"), "closed": "Christmas Day",
                          "prices": {"bag of compost": 6.99, "tomato plant": 3.50, "pot of basil": 2.25}},
    "the museum": {"hours": ("10:00", "16:30"), "closed": "Monday",
                   "prices": {"adult ticket": 9.00, "child ticket": 4.50, "audio guide": 3.00}},
}


def venue_qa(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Questions about opening times and prices of places other than the bakery, with consistent answers."""
    out = []
    for _ in range(n):
        name, v = rng.choice(list(VENUES.items()))
        kind = rng.randrange(4)
        if kind == 0:
            q = rng.choice(["What time does {v} open?", "When does {v} open in the morning?",
                            "How early is {v} open?"]).format(v=name)
            out.append((q, f"{name[0].upper() + name[1:]} opens at {v['hours'][0]}."))
        elif kind == 1:
            q = rng.choice(["How late is {v} open?", "What time does {v} close?",
                            "Until when is {v} open today?"]).format(v=name)
            out.append((q, f"It closes at {v['hours'][1]}, and it is closed on {v['closed']}."))
        elif kind == 2:
            item, cost = rng.choice(list(v["prices"].items()))
            q = rng.choice(["How much is a {i} at {v}?", "What does {v} charge for a {i}?",
                            "price of a {i} at {v}?"]).format(i=item, v=name)
            out.append((q, f"A {item} at {name} costs £{cost:.2f}."))
        else:
            q = rng.choice(["Is {v} open on {d}?", "Can I go to {v} on {d}?"])
            day = rng.choice(DAYS)
            closed = day in v["closed"]
            ans = (f"No, {name} is closed on {v['closed']}." if closed
                   else f"Yes, on {day} it is open from {v['hours'][0]} to {v['hours'][1]}.")
            out.append((q.format(v=name, d=day), ans))
    return out


def business_notes(rng: random.Random) -> list[str]:
    """Short notes and price lists about the bakery in varied wording (leaflets, board, reviews)."""
    notes = []
    frames = ["The {i} is {p}.", "{I}: {p}.", "You can buy a {i} for {p}.", "A {i} will cost you {p}.",
              "On the board today: {i}, {p}."]
    for item, (cost, _cat, allergens) in F.MENU.items():
        for frame in rng.sample(frames, 3):
            s = frame.format(i=item, I=item[0].upper() + item[1:], p=f"£{cost:.2f}")
            if allergens and rng.random() < 0.6:
                s += f" Allergens and notes: {allergens}."
            notes.append(s)
    for day, hours in F.HOURS:
        if hours is None:
            notes.append(f"On {day} {F.NAME} is closed all day.")
            notes.append(f"{day}: closed.")
        else:
            notes.append(f"On {day} the shop opens at {hours[0]} and closes at {hours[1]}.")
            notes.append(f"{day}: {hours[0]} to {hours[1]}.")
            notes.append(f"Every {day} the doors open at {hours[0]}.")
    reviews = [
        f"Lovely little bakery on Orchard Lane. The flat white was {F.price('flat white')} and the cinnamon bun was still warm.",
        "Went on a Monday and it was shut, which I should have checked first. Came back on Tuesday and it was worth it.",
        "Ordered a birthday cake three days ahead and it was perfect. The writing on top was free.",
        "Great sourdough, but get there early on a Saturday because it sells out.",
        "Staff were careful about my nut allergy and showed me the allergen folder.",
        "The terrace is dog friendly and they bring a water bowl out.",
        "Catering for our office meeting arrived on time and the platters were generous.",
    ]
    notes += reviews
    rng.shuffle(notes)
    return [" ".join(notes[i:i + 6]) for i in range(0, len(notes), 6)]
