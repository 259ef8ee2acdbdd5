"""URL routes of this app (included at the site root by config/urls.py)."""

from django.urls import include, path

from mailer import views, webhooks

urlpatterns = [
    path("api/emails/", views.email_create, name="email-create"),
    path("api/emails/<int:email_id>/", views.email_detail, name="email-detail"),
    path("api/emails/purge/", views.purge_create, name="email-purge"),
    path("api/emails/purge/<str:result_id>/", views.purge_detail, name="email-purge-detail"),
    # The providers' status webhooks, e.g. /anymail/postmark/tracking/, behind basic auth.
    path("anymail/", include((webhooks.guarded_anymail_urls(), "anymail"))),
]
