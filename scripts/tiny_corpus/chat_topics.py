"""Authored questions and answers for the chat data set.

Each topic has several ways a person actually asks the question, one or more answers (all agree
on the facts in `facts.py`), and optional follow-up exchanges that make natural multi-turn
conversations. `audience` is "customer" or "staff" and picks the system message.
"""

from __future__ import annotations

from . import facts as F
from .facts import price as p

TOPICS: list[dict] = [
    # ----------------------------------------------------------------- customers: visiting
    {
        "id": "hours",
        "audience": "customer",
        "q": [
            "What are your opening hours?",
            "When are you open?",
            "hi, what time do you open and close?",
            "Are you open every day?",
            "What times is the cafe open this week?",
            "Can you tell me your opening times please",
        ],
        "a": [
            f"We are open {F.HOURS_SHORT}.",
            f"Our hours are {F.HOURS_SHORT}. Hot food is served until {F.LAST_HOT_FOOD}.",
        ],
        "follow": [
            ("And on bank holidays?", f"On bank holidays we open {F.BANK_HOLIDAY}, whatever the day of the week."),
            ("Can I still get a toastie at 16:45 on a Thursday?",
             f"Sorry, no: the last hot food orders are taken {F.LAST_HOT_FOOD}, so 16:30 on a weekday. "
             "Cold food and drinks are available until we close at 17:00."),
        ],
    },
    {
        "id": "monday",
        "audience": "customer",
        "q": [
            "Are you open on Monday?",
            "Can I come in on a Monday morning?",
            "why are you always shut on mondays?",
        ],
        "a": [
            "No, we are closed on Mondays. That is our bakers' day off and the day we deep-clean the kitchen. "
            "We open again on Tuesday at 7:30.",
        ],
        "follow": [
            ("What about a bank holiday Monday?",
             f"Bank holiday Mondays are the exception: we open {F.BANK_HOLIDAY}."),
        ],
    },
    {
        "id": "sunday",
        "audience": "customer",
        "q": [
            "What time do you close on Sunday?",
            "Are you open Sunday afternoon?",
            "How late are you open on the weekend?",
        ],
        "a": [
            "On Sunday we are open from 9:00 to 14:00, and on Saturday from 8:00 to 16:00.",
        ],
        "follow": [
            ("Is it busy on Sunday mornings?",
             "Yes, between 10:00 and 12:00 it is our busiest time. Come before 10:00 if you want a quiet table."),
        ],
    },
    {
        "id": "location",
        "audience": "customer",
        "q": [
            "Where are you?",
            "What's your address?",
            "How do I find the bakery?",
            "where exactly is crumb and kettle",
        ],
        "a": [
            f"We are at {F.ADDRESS}, next to the post office. There is free two-hour parking on Orchard Lane "
            "and a bike rack outside the door.",
        ],
        "follow": [
            ("Is there parking?", "Yes, parking on Orchard Lane is free for up to two hours."),
            ("Is the entrance step-free?",
             "The front door has one step, but the side door on Mill Walk has a ramp and is step-free. "
             "We also have an accessible toilet."),
        ],
    },
    {
        "id": "contact",
        "audience": "customer",
        "q": [
            "How can I contact you?",
            "What's your phone number?",
            "Do you have an email address?",
        ],
        "a": [
            f"You can call us on {F.PHONE} during opening hours or email {F.EMAIL}. "
            "We answer emails within one working day.",
        ],
        "follow": [],
    },
    {
        "id": "seating",
        "audience": "customer",
        "q": [
            "How many seats do you have?",
            "Can I book a table?",
            "Do you take reservations?",
            "We are a group of 8, can we reserve a table for Wednesday lunch?",
        ],
        "a": [
            f"We have {F.SEATS_INSIDE} seats inside and {F.SEATS_TERRACE} on the terrace. Tables are first come, "
            "first served, but groups of six or more can book on weekdays by phone or email.",
        ],
        "follow": [
            ("Can we book for Saturday instead?",
             "Sorry, we don't take bookings at weekends because it is too busy. On Saturday it is first come, first served."),
        ],
    },
    {
        "id": "dogs",
        "audience": "customer",
        "q": [
            "Are dogs allowed?",
            "Can I bring my dog inside?",
            "is it dog friendly",
        ],
        "a": [
            "Dogs are very welcome on the terrace, and we keep a water bowl outside. Inside we only allow "
            "assistance dogs, because of the bakery kitchen.",
        ],
        "follow": [],
    },
    {
        "id": "wifi",
        "audience": "customer",
        "q": [
            "Do you have wifi?",
            "What's the wifi password?",
            "Can I work on my laptop there?",
        ],
        "a": [
            f"Yes, we have {F.WIFI}. Laptops are welcome on weekdays; at weekends we ask people to keep it "
            "to 90 minutes so everyone gets a table.",
        ],
        "follow": [
            ("Are there sockets?", "There are four sockets along the window bench on the left as you come in."),
        ],
    },
    {
        "id": "payment",
        "audience": "customer",
        "q": [
            "Do you take cards?",
            "Can I pay by card or is it cash only?",
            "Do you accept cheques?",
            "is there a minimum spend for card payments",
        ],
        "a": [
            "We take cash, all major cards, contactless and phone payments, with no minimum spend. "
            "We don't accept cheques.",
        ],
        "follow": [],
    },
    # ----------------------------------------------------------------- customers: menu and prices
    {
        "id": "bread_prices",
        "audience": "customer",
        "q": [
            "How much is a sourdough loaf?",
            "What bread do you sell and how much is it?",
            "price of your bread?",
            "How much are your loaves?",
        ],
        "a": [
            f"A sourdough loaf is {p('sourdough loaf')}, the seeded rye loaf is {p('seeded rye loaf')} "
            f"and a baguette is {p('baguette')}.",
        ],
        "follow": [
            ("Can you slice it for me?", "Yes, we slice any loaf for free. Just ask at the counter."),
            ("Do you ever run out?",
             "The sourdough often sells out by early afternoon on Saturdays. If you want one for sure, you can "
             "reserve it by phone the day before."),
        ],
    },
    {
        "id": "pastry_prices",
        "audience": "customer",
        "q": [
            "How much is a croissant?",
            "What pastries do you have?",
            "How much are the pastries?",
            "what does a pain au chocolat cost",
        ],
        "a": [
            f"A croissant is {p('croissant')}, a pain au chocolat {p('pain au chocolat')}, an almond croissant "
            f"{p('almond croissant')} and a cinnamon bun {p('cinnamon bun')}.",
        ],
        "follow": [
            ("Which one would you recommend?",
             "The cinnamon bun is the one regulars come back for. It is baked fresh every morning and is still warm around 8:30."),
            ("Are they baked on site?",
             f"Yes, everything is baked here every morning by {F.HEAD_BAKER} and the team, starting at 5:00."),
        ],
    },
    {
        "id": "coffee_prices",
        "audience": "customer",
        "q": [
            "How much is a flat white?",
            "What are your coffee prices?",
            "How much does a latte cost?",
            "coffee menu please",
        ],
        "a": [
            f"An espresso is {p('espresso')}, an americano {p('americano')}, a flat white {p('flat white')}, "
            f"and a latte or cappuccino {p('latte')}. A pot of tea is {p('pot of tea')} and a hot chocolate "
            f"{p('hot chocolate')}.",
        ],
        "follow": [
            ("How much is an extra shot?", f"An extra shot is {F.EXTRA_SHOT}."),
            ("Do you charge for oat milk?", f"No, we have {F.PLANT_MILK}."),
            ("Where is your coffee from?",
             f"Our beans come from {F.COFFEE_SUPPLIER}, a small roaster in the next town. The house espresso is a "
             "blend from Brazil and Ethiopia."),
        ],
    },
    {
        "id": "plant_milk",
        "audience": "customer",
        "q": [
            "Do you have oat milk?",
            "Is there a charge for soya milk?",
            "What non-dairy milks do you have?",
        ],
        "a": [f"Yes, we have {F.PLANT_MILK}."],
        "follow": [],
    },
    {
        "id": "reusable_cup",
        "audience": "customer",
        "q": [
            "Can I bring my own cup?",
            "Do you give a discount for a keep cup?",
            "is there money off if I bring a reusable cup",
        ],
        "a": [f"Yes, please do. You get {F.REUSABLE_CUP}."],
        "follow": [],
    },
    {
        "id": "savoury",
        "audience": "customer",
        "q": [
            "Do you serve lunch?",
            "What savoury food do you have?",
            "How much is the soup?",
            "anything for lunch that isn't sweet?",
        ],
        "a": [
            f"Yes. We have a sausage roll or a vegan lentil roll for {p('sausage roll')}, a toasted sandwich for "
            f"{p('toasted sandwich')}, and the soup of the day with bread for {p('soup of the day with bread')}.",
        ],
        "follow": [
            ("What's the soup today?",
             "The soup changes every day and is written on the board by the till. It is vegan on Tuesdays and Thursdays."),
            ("What fillings are in the toasties?",
             "The fillings change daily. There is always a cheese and a vegetarian option, and usually ham and mustard."),
        ],
    },
    {
        "id": "cake_slices",
        "audience": "customer",
        "q": [
            "What cakes do you have?",
            "How much is a slice of carrot cake?",
            "Do you sell cake by the slice?",
        ],
        "a": [
            f"Yes. A slice of carrot cake is {p('carrot cake slice')}, lemon drizzle is {p('lemon drizzle slice')}, "
            f"and the gluten-free brownie is {p('gluten-free brownie')}.",
        ],
        "follow": [
            ("Does the carrot cake have nuts?", "Yes, the carrot cake contains walnuts."),
        ],
    },
    {
        "id": "order_total",
        "audience": "customer",
        "q": [
            "How much would two flat whites and a croissant be?",
            "What do two flat whites and a croissant cost altogether?",
        ],
        "a": [
            f"Two flat whites at {p('flat white')} each and a croissant at {p('croissant')} come to £8.40.",
        ],
        "follow": [
            ("And with my own cups?",
             "With your own cups you save 20p on each hot drink, so it would be £8.00."),
        ],
    },
    {
        "id": "order_total2",
        "audience": "customer",
        "q": [
            "How much is a latte and a cinnamon bun?",
            "What would a latte and a cinnamon bun come to?",
        ],
        "a": [f"A latte is {p('latte')} and a cinnamon bun {p('cinnamon bun')}, so £6.20 together."],
        "follow": [
            ("Can I use my loyalty card for the latte?",
             "Yes. You get a stamp for the latte, and if it is your tenth hot drink it is free."),
        ],
    },
    # ----------------------------------------------------------------- customers: allergens and diets
    {
        "id": "allergens",
        "audience": "customer",
        "q": [
            "Do you have allergen information?",
            "I have a food allergy, how do I know what's safe?",
            "Where can I check allergens?",
        ],
        "a": [
            "Every product's allergens are listed in the allergen folder at the counter, and the team can check "
            "the recipe for you. Please tell us about your allergy when you order.",
        ],
        "follow": [
            ("Is anything nut-free?",
             "Several products have no nuts in the recipe, but our kitchen uses almonds, walnuts and hazelnuts every "
             "day, so we cannot guarantee that anything is free from traces of nuts."),
        ],
    },
    {
        "id": "nuts",
        "audience": "customer",
        "q": [
            "My son has a nut allergy. Is the croissant safe?",
            "Are your products nut free?",
            "Can someone with a peanut allergy eat here?",
        ],
        "a": [
            "The plain croissant has no nuts in the recipe, but it is baked in the same kitchen as our almond "
            "croissants and carrot cake, so we cannot guarantee it is free from traces of nuts. For a severe "
            "allergy we would advise against it.",
        ],
        "follow": [],
    },
    {
        "id": "gluten",
        "audience": "customer",
        "q": [
            "Do you have anything gluten-free?",
            "I'm coeliac, what can I eat?",
            "Is the brownie gluten free?",
        ],
        "a": [
            f"Our brownie ({p('gluten-free brownie')}) has no gluten ingredients, but it is made in a kitchen that "
            "uses flour all day, so it is not suitable for people with coeliac disease. All our bread and pastries "
            "contain gluten.",
        ],
        "follow": [
            ("What about drinks?", "All our hot drinks are gluten-free, and so is the soup if you have it without the bread; please check the board for the day's soup."),
        ],
    },
    {
        "id": "vegan",
        "audience": "customer",
        "q": [
            "What vegan options do you have?",
            "Is anything vegan?",
            "I'm vegan, what can I get?",
        ],
        "a": [
            "The sourdough, seeded rye and baguette are vegan, and so is the lentil roll. The soup is vegan on "
            f"Tuesdays and Thursdays, and every hot drink can be made with {F.PLANT_MILK}.",
        ],
        "follow": [
            ("Are the croissants vegan?", "No, the croissants are made with butter, milk and egg."),
        ],
    },
    {
        "id": "sesame",
        "audience": "customer",
        "q": [
            "Which breads contain sesame?",
            "Is there sesame in the rye?",
        ],
        "a": ["The seeded rye loaf contains sesame. The sourdough and the baguette have no sesame in the recipe."],
        "follow": [],
    },
    # ----------------------------------------------------------------- customers: orders and services
    {
        "id": "cake_order",
        "audience": "customer",
        "q": [
            "Can I order a birthday cake?",
            "How do I order a celebration cake?",
            "Do you make custom cakes?",
            "I need a cake for my daughter's birthday on Saturday, can you do that?",
        ],
        "a": [
            f"Yes, we make celebration cakes to order. Please order at least {F.CAKE_NOTICE} before you collect: "
            f"{F.CAKE_SIZES}. We take a {F.CAKE_DEPOSIT} deposit when you order.",
        ],
        "follow": [
            ("What flavours can I choose?", f"You can choose {F.CAKE_FLAVOURS}."),
            ("Can you write a name on it?", "Yes, writing on the cake is free. Just give us the exact wording when you order."),
            ("Can I cancel if plans change?",
             f"Yes. The {F.CAKE_DEPOSIT} deposit is refunded if you cancel at least 48 hours before collection."),
        ],
    },
    {
        "id": "cake_short_notice",
        "audience": "customer",
        "q": [
            "Can I get a cake for tomorrow?",
            "Is it too late to order a cake for tomorrow afternoon?",
        ],
        "a": [
            f"We need {F.CAKE_NOTICE} for a celebration cake, so tomorrow is too short, sorry. We usually have "
            "whole lemon drizzle and carrot cakes on the counter though; call in the morning and we can keep one for you.",
        ],
        "follow": [],
    },
    {
        "id": "catering",
        "audience": "customer",
        "q": [
            "Do you do catering for offices?",
            "Can you cater a meeting for 15 people?",
            "How does your catering work?",
            "we need lunch for a team meeting next week, what do you offer?",
        ],
        "a": [
            f"Yes. We cater for a minimum of {F.CATERING_MIN} with {F.CATERING_NOTICE} notice: "
            f"{F.CATERING_PRICES}. Delivery is {F.CATERING_DELIVERY}.",
        ],
        "follow": [
            ("So how much for 15 people with sandwiches and pastries?",
             "For 15 people the sandwich platter is £112.50 and the pastry platter £37.50, so £150 in total, "
             "and delivery is free because it is over £60."),
            ("Can you do vegan and gluten-free platters?",
             "We can make the sandwich platter fully vegan. We cannot offer a gluten-free platter, because "
             "everything is prepared in a kitchen that uses flour."),
            ("Do you send a VAT invoice?",
             "Yes, every catering order comes with a VAT invoice by email."),
        ],
    },
    {
        "id": "delivery",
        "audience": "customer",
        "q": [
            "Do you deliver?",
            "Can I get bread delivered?",
            "How does delivery work?",
            "do you deliver to Hillside Road?",
        ],
        "a": [
            f"Yes, we deliver {F.DELIVERY_DAYS} within {F.DELIVERY_RADIUS} of the shop. Order by "
            f"{F.DELIVERY_CUTOFF}; the minimum order is {F.DELIVERY_MIN} and delivery costs {F.DELIVERY_FEE}.",
        ],
        "follow": [
            ("Do you deliver on Sundays?", "No, deliveries run only from Tuesday to Saturday."),
            ("How do I order?", f"Order by phone on {F.PHONE} or by email to {F.EMAIL}, and pay by card over the phone or on the doorstep."),
        ],
    },
    {
        "id": "loyalty",
        "audience": "customer",
        "q": [
            "Do you have a loyalty card?",
            "How does the loyalty card work?",
            "Do my stamps expire?",
            "how many coffees until I get a free one",
        ],
        "a": [
            f"Yes, the Kettle Club card: you get {F.LOYALTY}. Stamps never expire.",
        ],
        "follow": [
            ("Does it count for pastries?", "No, stamps are only for hot drinks."),
            ("I lost my card, can you replace the stamps?",
             "We can give you a new card, but unfortunately we can't replace lost stamps because the cards aren't registered."),
        ],
    },
    {
        "id": "vouchers",
        "audience": "customer",
        "q": [
            "Do you sell gift vouchers?",
            "Can I buy a gift card?",
            "How long is a gift voucher valid?",
        ],
        "a": [f"Yes, we sell gift vouchers of {F.GIFT_VOUCHERS}. They can be used on anything in the shop."],
        "follow": [
            ("Can vouchers be used for a celebration cake?", "Yes, including the deposit on a celebration cake."),
        ],
    },
    {
        "id": "refunds",
        "audience": "customer",
        "q": [
            "The loaf I bought this morning is burnt on the bottom. Can I get a refund?",
            "What's your refund policy?",
            "Something was wrong with my order, what can I do?",
            "can i return a cake",
        ],
        "a": [
            "Sorry about that. If something isn't right, bring it back the same day with your receipt and we will "
            "replace it or give you a full refund, whichever you prefer.",
        ],
        "follow": [
            ("I don't have the receipt any more.",
             "That's fine if you paid by card: we can find the payment on the card machine. Otherwise we will "
             "happily replace the item."),
            ("What if I notice it the next day?",
             "Call us on " + F.PHONE + " and explain what happened; the manager, " + F.MANAGER + ", will sort it out with you."),
        ],
    },
    {
        "id": "private_hire",
        "audience": "customer",
        "q": [
            "Can I hire the cafe for a party?",
            "Do you do private hire?",
            "Could we rent the space for a baby shower?",
        ],
        "a": [
            f"Yes, the cafe can be hired on {F.PRIVATE_HIRE}. It holds about 40 people, and we can add catering at "
            "the usual catering prices.",
        ],
        "follow": [
            ("Can we bring our own cake?", "Yes, for private hire you are welcome to bring your own cake."),
        ],
    },
    {
        "id": "wholesale",
        "audience": "customer",
        "q": [
            "Do you supply bread to other cafes?",
            "I run a cafe, can I buy your bread wholesale?",
        ],
        "a": [
            "Yes, we supply a few local cafes. The minimum is 10 loaves a day, delivered before 8:00 from Tuesday "
            f"to Saturday. Email {F.EMAIL} and {F.OWNER} will send you the wholesale price list.",
        ],
        "follow": [],
    },
    {
        "id": "jobs",
        "audience": "customer",
        "q": [
            "Are you hiring?",
            "How can I apply for a job?",
            "do you have any vacancies for baristas",
        ],
        "a": [
            f"We post vacancies in the window and on our website. You can always send a CV to {F.EMAIL} "
            f"for the attention of {F.MANAGER}.",
        ],
        "follow": [],
    },
    {
        "id": "vat_invoice_customer",
        "audience": "customer",
        "q": [
            "Can I get a VAT receipt?",
            "I need a VAT invoice for my company, how do I get one?",
            "what is your VAT number",
        ],
        "a": [
            f"Yes. Ask at the till for a VAT receipt, or email {F.EMAIL} with the date and amount and we send a "
            f"VAT invoice within 24 hours. Our VAT number is {F.VAT_NUMBER}.",
        ],
        "follow": [],
    },
    # ----------------------------------------------------------------- staff: rota and work
    {
        "id": "shifts",
        "audience": "staff",
        "q": [
            "What are the shift times?",
            "What time does the early counter shift start?",
            "Remind me of the shift patterns?",
        ],
        "a": [
            "Bakers work 5:00 to 13:00. On the counter, the early shift is 7:00 to 15:00 and the late shift "
            "10:00 to 17:30. At weekends the counter shifts start half an hour later on Saturday and at 8:30 on Sunday.",
        ],
        "follow": [
            ("How long is the break?", "Shifts over six hours include a paid 20-minute break. Agree the time with the shift lead."),
        ],
    },
    {
        "id": "rota",
        "audience": "staff",
        "q": [
            "When is the rota published?",
            "When will I know next week's shifts?",
            "where do I find the rota",
        ],
        "a": [
            "The rota for the following week is posted every Thursday by 12:00, on the board in the back room "
            "and in the staff group chat.",
        ],
        "follow": [
            ("Can I ask for specific days?",
             f"Yes, tell {F.MANAGER} your availability by Tuesday evening and she will try to fit it into Thursday's rota."),
        ],
    },
    {
        "id": "swap",
        "audience": "staff",
        "q": [
            "Can I swap a shift with someone?",
            "How do shift swaps work?",
            "I need to swap my Saturday shift, what do I do?",
        ],
        "a": [
            f"You can swap with a colleague who is trained for the same role. Both of you must agree, and {F.MANAGER} "
            "has to approve the swap in the group chat before it counts.",
        ],
        "follow": [
            ("What if nobody can swap?",
             f"Then talk to {F.MANAGER} as early as possible. Don't just leave the shift uncovered."),
        ],
    },
    {
        "id": "holiday",
        "audience": "staff",
        "q": [
            "How do I book holiday?",
            "How much notice do I need for annual leave?",
            "can I take a week off in August",
        ],
        "a": [
            f"Request holiday from {F.MANAGER} at least two weeks in advance, using the holiday sheet in the back "
            "room. August and December are busy, so ask as early as you can for those months.",
        ],
        "follow": [],
    },
    {
        "id": "sick",
        "audience": "staff",
        "q": [
            "I'm ill and can't come in tomorrow, who do I tell?",
            "What's the sickness procedure?",
            "What do I do if I'm sick?",
        ],
        "a": [
            f"Call {F.MANAGER} (not a text) as early as possible, and before 6:00 if you are on the bake shift. "
            "If you have had vomiting or diarrhoea, you must stay off work for 48 hours after the last symptoms, "
            "because you handle food.",
        ],
        "follow": [],
    },
    {
        "id": "staff_discount",
        "audience": "staff",
        "q": [
            "Do staff get a discount?",
            "What's the staff discount?",
            "do I get free food on shift",
        ],
        "a": [
            "Staff get 50% off food and drinks during a shift and 25% off when off duty. Unsold bread at the end "
            "of the day can be taken home after the cash-up.",
        ],
        "follow": [],
    },
    {
        "id": "opening_checklist",
        "audience": "staff",
        "q": [
            "What's on the opening checklist?",
            "I'm opening tomorrow for the first time, what do I need to do?",
        ],
        "a": [
            "Turn off the alarm, switch on the coffee machine and let it heat for 20 minutes, record the fridge "
            "temperatures on the sheet (they must be 5°C or below), count the float, put out the pastries and "
            "write the soup on the board. Doors open at 7:30 on weekdays.",
        ],
        "follow": [
            ("What if a fridge is above 5°C?",
             f"Move the food to the other fridge, note it on the temperature sheet, and tell {F.MANAGER} straight away."),
        ],
    },
    {
        "id": "closing",
        "audience": "staff",
        "q": [
            "What do I need to do at closing?",
            "How do I close the shop?",
            "closing routine?",
        ],
        "a": [
            "Take the last hot food orders 30 minutes before closing, clean and back-flush the coffee machine, "
            "cash up the till, leave the £150 float in the safe, bag the unsold bread, mop the floor and set the alarm.",
        ],
        "follow": [
            ("What happens to the unsold bread?",
             "Staff can take some home; the rest goes to the Millbrook community pantry, which collects at 17:30 on weekdays."),
        ],
    },
    # ----------------------------------------------------------------- staff: suppliers
    {
        "id": "flour",
        "audience": "staff",
        "q": [
            "When does the flour arrive?",
            "Who supplies our flour?",
            "When do I need to order flour for Tuesday?",
        ],
        "a": [
            f"Flour comes from {F.FLOUR_SUPPLIER} on Tuesdays and Fridays. Order by Sunday evening for the Tuesday "
            "delivery and by Wednesday evening for the Friday delivery.",
        ],
        "follow": [
            ("How much do we usually order?",
             "A normal week is about 300 kg of strong white flour and 50 kg of rye, split over the two deliveries. "
             "Check the stock sheet before ordering."),
        ],
    },
    {
        "id": "dairy",
        "audience": "staff",
        "q": [
            "When does the milk come?",
            "Who is our dairy supplier?",
            "we are running low on milk, when is the next delivery?",
        ],
        "a": [
            f"Milk, butter and cream come from {F.DAIRY_SUPPLIER} every day except Monday, before 6:30. "
            "Changes to the standing order must be made by 14:00 the day before.",
        ],
        "follow": [
            ("And if we run out during the day?",
             "Buy what you need from the corner shop, keep the receipt and put it in the petty cash tin."),
        ],
    },
    {
        "id": "coffee_beans",
        "audience": "staff",
        "q": [
            "When are the coffee beans delivered?",
            "How do I order more coffee beans?",
        ],
        "a": [
            f"Beans come from {F.COFFEE_SUPPLIER} every Wednesday. Order by Monday night through their website; "
            "we normally need 12 kg of house espresso and 2 kg of decaf a week.",
        ],
        "follow": [],
    },
    {
        "id": "delivery_check",
        "audience": "staff",
        "q": [
            "What do I check when a delivery arrives?",
            "How do I receive a supplier delivery?",
        ],
        "a": [
            "Check the items against the delivery note, check that chilled goods are at 5°C or below, sign the note, "
            "and put chilled items away first. Write any missing or damaged items on the note before the driver leaves.",
        ],
        "follow": [
            ("What if something is missing?",
             "Write it on the delivery note, photograph it, and email the supplier the same day so we get a credit note."),
        ],
    },
    {
        "id": "payment_terms",
        "audience": "staff",
        "q": [
            "When do we pay suppliers?",
            "What are our supplier payment terms?",
        ],
        "a": [
            f"Suppliers are paid by bank transfer on 30-day terms. {F.OWNER} approves the payments every Friday.",
        ],
        "follow": [],
    },
    # ----------------------------------------------------------------- staff: bookkeeping
    {
        "id": "cash_up",
        "audience": "staff",
        "q": [
            "How do I cash up?",
            "What's the cash-up procedure?",
            "the till is £3 short, what do I do?",
        ],
        "a": [
            "Print the Z-report, count the cash, take out the £150 float and put it in the safe. Write the cash, "
            "card total and any difference on the cash-up sheet and sign it. Differences over £5 must be reported "
            f"to {F.MANAGER} the same day.",
        ],
        "follow": [
            ("Where does the rest of the cash go?", "Put it in a banking bag with the cash-up sheet in the safe. It is banked every Tuesday and Friday."),
        ],
    },
    {
        "id": "expenses",
        "audience": "staff",
        "q": [
            "How do I record an expense?",
            "I bought cleaning supplies with petty cash, how do I log it?",
        ],
        "a": [
            "Keep the receipt, write the date, amount and what it was for on it, and put it in the petty cash tin. "
            "Every Monday the receipts are entered in the Kettle ledger spreadsheet.",
        ],
        "follow": [
            ("How long do we keep receipts?", "Receipts and invoices are kept for six years, in the labelled boxes in the office."),
        ],
    },
    {
        "id": "vat_rates",
        "audience": "staff",
        "q": [
            "Which items have VAT on them?",
            "Do we charge VAT on takeaway bread?",
            "How does VAT work for eat-in and takeaway?",
        ],
        "a": [
            "As our accountant explained it: cold takeaway food such as bread and cake is zero-rated, while hot food, "
            "hot drinks and anything eaten in is charged at the standard 20% rate. The till applies the right rate "
            "when you press Eat In or Take Away, so always ask the customer.",
        ],
        "follow": [
            ("What about a toasted sandwich to take away?", "It is hot food, so it is standard-rated at 20%, even to take away."),
        ],
    },
    {
        "id": "vat_return",
        "audience": "staff",
        "q": [
            "When is the VAT return due?",
            "Who does our VAT return?",
        ],
        "a": [
            f"We file VAT returns quarterly. {F.ACCOUNTANT}, our accountant, prepares them from the Kettle ledger, "
            "so the ledger must be complete by the 5th of the month after each quarter ends.",
        ],
        "follow": [],
    },
    {
        "id": "issue_invoice",
        "audience": "staff",
        "q": [
            "A customer wants a VAT invoice, how do I make one?",
            "How do I write a VAT invoice for a catering order?",
        ],
        "a": [
            "Use the invoice template in the shared drive. It must show our name and address, our VAT number "
            f"{F.VAT_NUMBER}, an invoice number, the date, the customer's name, each item with its VAT rate, and "
            "the totals with and without VAT. Use the next number in the invoice log.",
        ],
        "follow": [
            ("Do I send it myself?", f"Yes, email it from {F.EMAIL} and copy {F.MANAGER}."),
        ],
    },
    {
        "id": "month_end",
        "audience": "staff",
        "q": [
            "What happens at month end?",
            "How do we reconcile the bank account?",
        ],
        "a": [
            "By the 5th of each month, match every line on the bank statement to a sale, an invoice or a receipt in "
            f"the Kettle ledger, and list anything unexplained for {F.OWNER}.",
        ],
        "follow": [],
    },
]

SYSTEM_CUSTOMER = [
    f"You are the assistant of {F.NAME}, a bakery and cafe at {F.ADDRESS}. Answer customers briefly and accurately.",
    f"You answer questions from customers of {F.NAME}. Be friendly and give exact prices and times.",
    f"You are a helpful assistant for {F.NAME} bakery and cafe.",
]
SYSTEM_STAFF = [
    f"You help the team at {F.NAME} with rotas, suppliers and bookkeeping. Be precise.",
    f"You are the internal assistant for staff at {F.NAME}.",
]

# Ways people join a second question onto a conversation.
LINKS = ["Thanks! ", "Great, thanks. ", "OK. ", "Good to know. ", "Perfect. One more thing: ", "", "Thank you. Also, "]
