"""The analytical planner: pure Python, never imports torch at module level."""
