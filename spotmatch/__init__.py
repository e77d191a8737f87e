"""spotmatch"""
