from django.apps import AppConfig


class SiteConfig(AppConfig):
    """The site itself (settings, URLs, web and ops plumbing): installed for its system checks."""

    name = "config"
    label = "site"
    verbose_name = "jobsite"

    def ready(self) -> None:
        from config import checks  # noqa: F401 - registers the site's system checks
