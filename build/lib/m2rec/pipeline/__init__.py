"""Wiring for the Kubeflow pipeline (defined in the `pipelines` and `components` packages, installed beside m2rec):
its settings, the local run with `kfp.local`, submission to a Kubeflow Pipelines endpoint, lineage and reports.
The library never imports the pipeline definition; the CLI (a driver) builds it and hands it over. Importing this
package does not import kfp."""
