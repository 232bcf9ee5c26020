"""Test doubles that ship with flow: an OpenAI-compatible local server (scripted models live in
`orchestrator.llm.scripted`)."""

from orchestrator.testing.server import ChatServer, ServerReply, chat_response, scripted_handler

__all__ = ["ChatServer", "ServerReply", "chat_response", "scripted_handler"]
