"""The fictional business behind all project text: Crumb & Kettle, a neighbourhood bakery and cafe.

Every conversation and every handbook page reads its numbers from here, so prices, hours and
policies agree everywhere and a model can learn them.
"""

from __future__ import annotations

NAME = "Crumb & Kettle"
ADDRESS = "14 Orchard Lane, Millbrook"
PHONE = "01632 960418"
EMAIL = "hello@crumbandkettle.example"
OWNER = "Maya Okafor"
HEAD_BAKER = "Tom Reyes"
MANAGER = "Priya Shah"
ACCOUNTANT = "Dana Whitfield"
VAT_NUMBER = "GB 318 4402 17"

HOURS = [
    ("Monday", None),
    ("Tuesday", ("7:30", "17:00")),
    ("Wednesday", ("7:30", "17:00")),
    ("Thursday", ("7:30", "17:00")),
    ("Friday", ("7:30", "17:00")),
    ("Saturday", ("8:00", "16:00")),
    ("Sunday", ("9:00", "14:00")),
]
HOURS_SHORT = "Tuesday to Friday 7:30 to 17:00, Saturday 8:00 to 16:00 and Sunday 9:00 to 14:00; we are closed on Mondays"
BANK_HOLIDAY = "9:00 to 14:00"
LAST_HOT_FOOD = "30 minutes before closing"

# name -> (price in pounds, category, allergens / notes)
MENU = {
    "sourdough loaf": (4.50, "bread", "wheat (gluten); vegan"),
    "seeded rye loaf": (4.80, "bread", "rye and wheat (gluten), sesame; vegan"),
    "baguette": (2.40, "bread", "wheat (gluten); vegan"),
    "croissant": (2.20, "pastry", "wheat (gluten), milk, egg"),
    "pain au chocolat": (2.60, "pastry", "wheat (gluten), milk, egg, soya"),
    "almond croissant": (3.10, "pastry", "wheat (gluten), milk, egg, almonds"),
    "cinnamon bun": (2.90, "pastry", "wheat (gluten), milk, egg"),
    "sausage roll": (3.40, "savoury", "wheat (gluten), egg, pork"),
    "lentil roll": (3.40, "savoury", "wheat (gluten), celery; vegan"),
    "toasted sandwich": (6.50, "savoury", "wheat (gluten), milk; fillings change daily"),
    "soup of the day with bread": (5.80, "savoury", "changes daily; ask at the counter"),
    "carrot cake slice": (3.50, "cake", "wheat (gluten), milk, egg, walnuts"),
    "lemon drizzle slice": (3.20, "cake", "wheat (gluten), milk, egg"),
    "gluten-free brownie": (3.00, "cake", "milk, egg; no gluten ingredients but made in a kitchen that uses flour"),
    "espresso": (2.10, "drink", ""),
    "americano": (2.60, "drink", ""),
    "flat white": (3.10, "drink", "milk"),
    "latte": (3.30, "drink", "milk"),
    "cappuccino": (3.30, "drink", "milk"),
    "pot of tea": (2.50, "drink", ""),
    "hot chocolate": (3.20, "drink", "milk"),
}
EXTRA_SHOT = "50p"
PLANT_MILK = "oat and soya milk at no extra charge"
REUSABLE_CUP = "20p off any hot drink in your own reusable cup"


def price(item: str) -> str:
    """Price of a menu item formatted as on the board, e.g. '£4.50'."""
    return f"£{MENU[item][0]:.2f}"


CAKE_NOTICE = "72 hours (three days)"
CAKE_SIZES = "an 8-inch cake serves about 12 and costs £32; a 10-inch cake serves about 20 and costs £45"
CAKE_DEPOSIT = "£10"
CAKE_FLAVOURS = "chocolate fudge, lemon and elderflower, carrot with cream cheese, and vanilla sponge with raspberry"

CATERING_NOTICE = "48 hours"
CATERING_MIN = "10 people"
CATERING_PRICES = "the sandwich platter is £7.50 per person and the pastry platter is £2.50 per person"
CATERING_DELIVERY = "free within 3 miles on catering orders over £60, otherwise £5"

DELIVERY_DAYS = "Tuesday to Saturday between 8:00 and 11:00"
DELIVERY_RADIUS = "3 miles"
DELIVERY_CUTOFF = "16:00 the day before"
DELIVERY_MIN = "£20"
DELIVERY_FEE = "£3.50, free on orders over £40"

LOYALTY = "one stamp for every hot drink; the tenth hot drink is free"

SEATS_INSIDE = 28
SEATS_TERRACE = 12
GIFT_VOUCHERS = "£10, £20 and £25, valid for 12 months"
PRIVATE_HIRE = "Sunday afternoons after we close, from 15:00 to 19:00, for £150"
WIFI = "free Wi-Fi; the password is on the receipt and on the board by the till"

FLOUR_SUPPLIER = "Hollow Mill"
DAIRY_SUPPLIER = "Greenacre Dairy"
COFFEE_SUPPLIER = "Northpoint Roasters"
