"""How the orchestrator's values become text that other programs parse."""
