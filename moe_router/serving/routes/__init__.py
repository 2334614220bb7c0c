"""The endpoints, one APIRouter per access level: create_app puts the API key in front of the ones that need it."""
