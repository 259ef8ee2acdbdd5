from django.apps import AppConfig


class SiteConfig(AppConfig):
    """The site itself (settings, URLs, web and ops plumbing): installed for its system checks."""

    name = "config"
    label = "site"
    verbose_name = "jobsite"

    def ready(self) -> None:
        from django.contrib import admin

        from config import checks  # noqa: F401 - registers the site's system checks

        admin.site.site_header = "jobsite administration"
        admin.site.site_title = "jobsite admin"
        admin.site.index_title = "Background jobs and the site's data"
        admin.site.site_url = "/"
