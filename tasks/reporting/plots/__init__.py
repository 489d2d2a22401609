"""Every figure agelens draws, with matplotlib's object API (`Figure`, never pyplot, whose global
state is not thread-safe) and user strings shown as text, never parsed as math. One module per
group of stages that draws them, so that editing one figure reruns only the stages that draw it."""
