"""Moved: the OpenAI codec's decode stage is gateway.api.openai.request_stage (re-exported here)."""

from gateway.api.openai.request_stage import DecodeStage as DecodeStage
