"""Crash harness and property tests for durable runs (journal, resume, rollback)."""
