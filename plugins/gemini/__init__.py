"""The `gemini` adapter: Google's Gemini API natively (plugins.gemini.adapter)."""
