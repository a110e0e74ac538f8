"""Routes for people watching a fit: the history plot, live events and the web page."""

from fastapi import APIRouter

router = APIRouter()
