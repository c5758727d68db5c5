"""Word lists of the paper-protocol task suite (`gallop_kernels/reproduce/suite.py`), written by hand.

Every word that a task offers as a *choice* (object names, antonyms, category members used by
``odd_one_out``) is one token with a leading space in SmolLM2's tokenizer (checked when the lists
were written), so that every item of the suite is scored from one forward pass of its prompt; a
tokenizer that splits them still works, through one row per choice (`suite.encode_item`).
"""

from __future__ import annotations

CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "animal": (
        "dog", "cat", "horse", "cow", "pig", "sheep", "goat", "lion", "tiger", "bear", "wolf",
        "fox", "rabbit", "mouse", "elephant", "giraffe", "zebra", "monkey", "deer", "camel",
        "kangaroo", "squirrel", "donkey", "leopard", "cheetah", "hippo", "rhino", "panda", "koala",
        "otter", "beaver", "hamster", "moose", "badger", "gorilla", "rat", "duck", "goose", "owl",
        "eagle", "parrot", "frog", "snake", "turtle", "shark", "whale", "dolphin", "seal",
        "penguin", "chicken", "crow", "pigeon", "bat", "lizard", "crocodile"),
    "fruit": (
        "apple", "banana", "orange", "grape", "pear", "peach", "plum", "cherry", "lemon", "lime",
        "mango", "pineapple", "strawberry", "blueberry", "raspberry", "watermelon", "melon", "kiwi",
        "apricot", "coconut", "papaya", "fig", "grapefruit", "pomegranate", "nectarine",
        "tangerine", "blackberry", "cranberry", "guava", "lychee", "avocado"),
    "vehicle": (
        "car", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "helicopter", "boat",
        "ship", "taxi", "van", "tractor", "scooter", "submarine", "tram", "ambulance", "yacht",
        "canoe", "jeep", "limousine", "sailboat", "ferry", "rocket", "skateboard", "minivan",
        "bulldozer", "glider", "kayak", "sled", "wagon", "jet"),
    "clothing": (
        "shirt", "jacket", "coat", "sweater", "dress", "skirt", "jeans", "trousers", "shorts",
        "sock", "shoe", "boot", "hat", "cap", "scarf", "glove", "tie", "belt", "blouse", "hoodie",
        "vest", "pajamas", "sandal", "raincoat", "suit", "uniform", "cardigan", "mitten", "slipper",
        "swimsuit", "tuxedo", "sneaker", "leggings", "poncho"),
    "tool": (
        "hammer", "saw", "drill", "wrench", "screwdriver", "pliers", "shovel", "rake", "axe",
        "chisel", "ladder", "scissors", "knife", "needle", "broom", "mop", "bucket", "tape",
        "ruler", "file", "clamp", "crowbar", "spade", "trowel", "hoe", "sickle"),
    "furniture": (
        "chair", "table", "sofa", "bed", "desk", "shelf", "cabinet", "stool", "bench", "dresser",
        "wardrobe", "couch", "armchair", "bookcase", "cupboard", "mattress", "crib", "ottoman",
        "recliner", "nightstand"),
    "instrument": (
        "piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello", "saxophone",
        "clarinet", "trombone", "banjo", "ukulele", "organ", "accordion", "tuba", "harmonica",
        "oboe", "bagpipes", "xylophone", "tambourine", "mandolin"),
    "color": (
        "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white",
        "gray", "violet", "turquoise", "maroon", "beige", "crimson", "indigo", "magenta", "scarlet",
        "navy"),
    "job": (
        "doctor", "teacher", "nurse", "farmer", "pilot", "lawyer", "engineer", "chef", "baker",
        "driver", "painter", "dentist", "plumber", "carpenter", "soldier", "police", "firefighter",
        "judge", "writer", "singer", "actor", "banker", "cashier", "waiter", "scientist"),
    "sport": (
        "football", "tennis", "golf", "baseball", "basketball", "hockey", "cricket", "rugby",
        "soccer", "boxing", "swimming", "cycling", "skiing", "volleyball", "wrestling", "surfing",
        "rowing", "fencing", "archery", "badminton"),
    "vegetable": (
        "carrot", "potato", "onion", "tomato", "cabbage", "lettuce", "spinach", "broccoli",
        "cucumber", "pepper", "garlic", "celery", "pea", "bean", "corn", "pumpkin", "radish",
        "turnip", "beet", "zucchini", "eggplant", "cauliflower", "asparagus"),
}

MULTI_TOKEN_WORDS: frozenset[str] = frozenset((
    "accordion", "apricot", "archery", "armchair", "badger", "badminton", "bagpipes", "banjo",
    "banker", "beige", "blackberry", "blouse", "blueberry", "bookcase", "bulldozer", "cardigan",
    "cashier", "cello", "cheetah", "chisel", "clarinet", "crimson", "crowbar", "cupboard",
    "dresser", "firefighter", "glider", "guava", "hamster", "harmonica", "hippo", "hoe", "hoodie",
    "jeep", "kayak", "koala", "leggings", "limousine", "lychee", "magenta", "mandolin", "maroon",
    "melon", "minivan", "mitten", "mop", "nectarine", "nightstand", "oboe", "otter", "ottoman",
    "pajamas", "pliers", "plumber", "poncho", "radish", "raincoat", "raspberry", "recliner",
    "sailboat", "sandal", "saxophone", "scarf", "scooter", "screwdriver", "skateboard", "slipper",
    "sneaker", "sofa", "spade", "sweater", "swimsuit", "tambourine", "tangerine", "trombone",
    "trowel", "tuba", "turnip", "tuxedo", "ukulele", "waiter", "wardrobe", "xylophone", "yacht",
    "zucchini",
))
"""Category words that SmolLM2 splits into several tokens: named by `kind` (in the question), never
offered as an option (``odd_one_out``)."""

SIZES_M: dict[str, float] = {
    "ant": 0.004, "flea": 0.002, "mosquito": 0.005, "fly": 0.007, "bee": 0.015, "pea": 0.008,
    "grape": 0.02, "coin": 0.024, "button": 0.015, "ring": 0.02, "spider": 0.02, "marble": 0.015,
    "key": 0.06, "egg": 0.06, "mouse": 0.08, "frog": 0.08, "apple": 0.08, "cup": 0.1, "phone": 0.15,
    "spoon": 0.18, "pencil": 0.18, "banana": 0.2, "bird": 0.2, "book": 0.25, "shoe": 0.28, "bottle":
    0.3, "rabbit": 0.4, "chicken": 0.4, "cat": 0.5, "duck": 0.5, "pillow": 0.6, "fox": 0.7, "dog":
    0.8, "chair": 0.9, "guitar": 1.0, "child": 1.2, "sheep": 1.2, "table": 1.5, "piano": 1.5, "man":
    1.75, "bicycle": 1.8, "bed": 2.0, "door": 2.0, "bear": 2.0, "tiger": 2.5, "lion": 2.5, "horse":
    2.4, "cow": 2.5, "dolphin": 2.5, "camel": 3.0, "car": 4.5, "giraffe": 5.0, "shark": 5.0,
    "elephant": 6.0, "truck": 10.0, "bus": 12.0, "tree": 15.0, "house": 15.0, "whale": 25.0,
    "church": 40.0, "airplane": 60.0, "building": 100.0, "ship": 200.0, "train": 200.0, "tower":
    300.0, "bridge": 500.0, "stadium": 300.0, "hill": 300.0, "mountain": 4000.0, "lake": 5000.0,
    "island": 10000.0, "city": 20000.0, "forest": 20000.0, "country": 1000000.0, "ocean": 5000000.0,
    "moon": 3500000.0, "planet": 10000000.0, "sun": 1400000000.0, "galaxy": 1e+21, "star":
    1000000000.0, "atom": 1e-10, "cell": 1e-05, "hair": 0.0001, "dust": 1e-05, "sand": 0.0005,
    "seed": 0.005, "leaf": 0.1, "rock": 0.3, "wave": 2.0, "cloud": 1000.0, "river": 100000.0,
    "desert": 1000000.0, "volcano": 3000.0,
}

ANTONYMS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("tall", "short"),
    ("hard", "soft"), ("wet", "dry"), ("full", "empty"), ("rich", "poor"), ("strong", "weak"),
    ("loud", "quiet"), ("early", "late"), ("thick", "thin"), ("heavy", "light"), ("high", "low"),
    ("black", "white"), ("day", "night"), ("good", "bad"), ("true", "false"), ("up", "down"),
    ("first", "last"), ("clean", "dirty"), ("cheap", "expensive"), ("safe", "dangerous"), ("inside",
    "outside"), ("north", "south"), ("east", "west"), ("love", "hate"), ("alive", "dead"),
    ("before", "after"), ("above", "below"), ("friend", "enemy"), ("smooth", "rough"), ("win",
    "lose"), ("push", "pull"), ("open", "closed"), ("old", "young"), ("buy", "sell"), ("sweet",
    "sour"), ("start", "finish"), ("give", "take"), ("near", "far"), ("wide", "narrow"), ("bright",
    "dark"), ("long", "short"), ("deep", "shallow"), ("easy", "difficult"), ("fat", "thin"),
    ("sharp", "dull"), ("tight", "loose"), ("brave", "afraid"), ("polite", "rude"), ("kind",
    "cruel"), ("noisy", "quiet"), ("wild", "tame"), ("sick", "healthy"), ("awake", "asleep"),
    ("simple", "complex"), ("public", "private"), ("rise", "fall"), ("major", "minor"), ("ancient",
    "modern"), ("arrive", "leave"), ("accept", "refuse"), ("add", "subtract"), ("begin", "end"),
    ("borrow", "lend"), ("catch", "throw"), ("come", "go"), ("cry", "laugh"), ("enter", "exit"),
    ("forget", "remember"), ("increase", "decrease"), ("lead", "follow"), ("lie", "truth"),
    ("maximum", "minimum"), ("more", "less"), ("never", "always"), ("often", "rarely"), ("pass",
    "fail"), ("question", "answer"), ("send", "receive"), ("show", "hide"), ("sit", "stand"),
    ("spend", "save"), ("teach", "learn"), ("top", "bottom"), ("victory", "defeat"), ("war",
    "peace"), ("winter", "summer"), ("wrong", "right"), ("yes", "no"), ("guilty", "innocent"),
    ("humble", "proud"), ("even", "odd"), ("solid", "liquid"), ("positive", "negative"), ("inner",
    "outer"), ("upper", "lower"), ("front", "back"), ("male", "female"), ("husband", "wife"),
    ("king", "queen"), ("boy", "girl"), ("brother", "sister"), ("uncle", "aunt"), ("son",
    "daughter"), ("father", "mother"), ("morning", "evening"), ("sunrise", "sunset"), ("floor",
    "ceiling"), ("heaven", "hell"), ("import", "export"), ("input", "output"), ("interior",
    "exterior"), ("join", "separate"), ("multiply", "divide"), ("natural", "artificial"),
    ("include", "exclude"), ("visible", "invisible"), ("horizontal", "vertical"), ("raw", "cooked"),
    ("wise", "foolish"), ("generous", "selfish"), ("calm", "angry"), ("joy", "sorrow"), ("hope",
    "despair"), ("success", "failure"), ("gain", "loss"), ("profit", "loss"), ("attack", "defend"),
    ("create", "destroy"), ("build", "destroy"), ("found", "lost"), ("full", "hungry"), ("sharp",
    "blunt"), ("straight", "curved"), ("native", "foreign"), ("formal", "casual"), ("junior",
    "senior"), ("permanent", "temporary"), ("rural", "urban"), ("dense", "sparse"), ("famous",
    "unknown"), ("legal", "illegal"), ("possible", "impossible"), ("correct", "incorrect"),
    ("honest", "dishonest"), ("patient", "impatient"), ("happy", "unhappy"), ("friendly",
    "hostile"), ("beautiful", "ugly"), ("clever", "stupid"), ("interesting", "boring"), ("busy",
    "idle"), ("sweet", "bitter"), ("cool", "warm"), ("fancy", "plain"), ("frequent", "rare"),
    ("gentle", "rough"), ("light", "dark"), ("entrance", "exit"), ("float", "sink"), ("freeze",
    "melt"), ("wake", "sleep"), ("agree", "disagree"), ("appear", "disappear"), ("allow", "forbid"),
)

REVIEW_SUBJECTS: tuple[str, ...] = (
    "The food", "The movie", "The hotel", "The service", "The book", "The concert", "The game",
    "The trip", "The room", "The phone", "The show", "The restaurant", "The staff", "The class",
    "The car", "The museum", "The beach", "The coffee", "The album", "The flight",
)

POSITIVE_PREDICATES: tuple[str, ...] = (
    "was wonderful", "was excellent", "was delicious", "was amazing", "was great", "was fantastic",
    "was lovely", "was perfect", "was a delight", "exceeded my expectations", "made me very happy",
    "was worth every penny", "was a pleasure", "was brilliant", "was superb", "was charming",
    "was fun from start to finish", "left me smiling", "was the best I have had", "was beautiful",
)

NEGATIVE_PREDICATES: tuple[str, ...] = (
    "was terrible", "was awful", "was disgusting", "was boring", "was horrible", "was a disaster",
    "was disappointing", "was dreadful", "was a waste of money", "made me angry",
    "was the worst I have had", "was rude and slow", "left me upset", "was dirty",
    "was painful to sit through", "was a complete mess", "ruined my day", "was overpriced and bad",
    "was annoying", "was miserable",
)
