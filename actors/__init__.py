"""actorbus built-in actors (dispatcher, handler pools, breakers, relay, resolver)."""

__all__: list[str] = []
