# A hub image for zero-to-jupyterhub with hub-transfer built in.
#
# The base is the chart's own hub image: set HUB_IMAGE_TAG to the tag your
# chart release uses (`helm show values jupyterhub/jupyterhub | grep -A3 'hub:'`
# prints it), so the hub's JupyterHub version stays the one the chart expects.
# The chart execs every *.py in /usr/local/etc/jupyterhub/jupyterhub_config.d/,
# which is where the service's config fragment goes.
ARG HUB_IMAGE_TAG=4.3.1
FROM quay.io/jupyterhub/k8s-hub:${HUB_IMAGE_TAG}

USER root
COPY --chown=root:root . /tmp/hub-transfer
RUN python3 -m pip install --no-cache-dir /tmp/hub-transfer \
 && install -D -m 0644 /tmp/hub-transfer/jupyterhub_config.d/hub_transfer.py \
      /usr/local/etc/jupyterhub/jupyterhub_config.d/hub_transfer.py \
 && rm -rf /tmp/hub-transfer
USER ${NB_USER:-jovyan}
