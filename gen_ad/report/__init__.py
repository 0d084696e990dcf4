"""Reports: figures (ROC/PR curves, histograms, box plots, image grids) and the HTML report."""
