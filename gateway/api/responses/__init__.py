"""The OpenAI Responses codec: `POST /v1/responses`, and the stored responses behind `GET`/`DELETE
/v1/responses/{id}` (issue 11). See docs/responses.md."""
