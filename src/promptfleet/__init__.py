"""PromptFleet: multi-tenant prompt-tuning serving on one shared GPT-2 backbone."""
__version__ = "0.1.0"
