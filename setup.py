"""Packaging for fsdit; every field comes from settings.ini (the nbdev 2 layout)."""
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

def _reqs(key): return cfg.get(key, '').split()

# settings.ini names the license as nbdev does; the package metadata carries its SPDX expression (PEP 639), with no
# `License ::` classifier beside it (setuptools >= 77 refuses the two together, and warns about the classifier alone)
licenses = {'apache2': 'Apache-2.0'}
setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'],
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    author=cfg['author'], author_email=cfg['author_email'], url=cfg['git_url'],
    license_expression=licenses[cfg['license']],
    keywords=cfg['keywords'].split(), python_requires=f">={cfg['min_python']}",
    classifiers=['Programming Language :: Python :: 3',
                 'Intended Audience :: Science/Research', 'Topic :: Scientific/Engineering :: Artificial Intelligence'],
    packages=setuptools.find_packages(include=['fsdit', 'fsdit.*']), include_package_data=True,
    install_requires=_reqs('requirements'),
    extras_require={'dev': _reqs('dev_requirements'), 'fid': _reqs('fid_requirements'), 'app': _reqs('app_requirements')},
    entry_points={'console_scripts': cfg['console_scripts'].split(),
                  'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
