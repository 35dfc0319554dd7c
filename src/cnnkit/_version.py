"""cnnkit's version: the lowest module, so that any module may name it without importing the
package root."""

__version__ = "0.1.0"
