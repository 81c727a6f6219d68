"""Tasks: loading data sets (hub or local files, package resources) into disjoint ground-truth, weak-label and test
sets (tasks), and the text formats of each data set (formats, a registry). Imports only core."""
