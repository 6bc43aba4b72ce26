"""Named limits, checked at the edges and reported in words a person understands."""

# Characters of one message that reach the model; the whole message is still stored and shown.
MAX_MESSAGE_CHARS = 8_000
# Beyond this a message is refused outright (nothing generated, nothing stored).
MAX_STORED_MESSAGE_CHARS = 200_000
# Prompt tokens kept after truncating the oldest turns (further capped by the model's window).
DEFAULT_MAX_CONTEXT_TOKENS = 2048

MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 2.0
MAX_NEW_TOKENS_LIMIT = 1024
# A reply's default length limit: room for the bundled model's replies to end on their own mostly.
DEFAULT_MAX_NEW_TOKENS = 256
