"""The life of a match-all run between its kick-off and its read: pure records, policies and cursors."""
