"""Advice: the coach's pure rules, and the coach that listens to a session's events."""
