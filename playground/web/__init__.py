"""The Gradio UI: the chat page and the admin panel; callbacks call the services."""
